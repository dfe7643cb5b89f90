"""Guarantees 1-3: exactly-once effect, automatic correlation, compensation in any order."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from uuid import uuid4

import pytest

import services
from choreo import Envelope, EventStore, InMemoryStore, Processor, open_store
from choreo.aggregates import load_aggregate
from choreo.events import Event
from services import inventory, payment
from services.contracts import ItemsReserved, OrderPlaced, PaymentDeclined, ShipmentRejected

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SAGA = "saga-1"


def envelope_of(event: Event, *, service: str, outcome: str | None = None, step: str | None = None) -> Envelope:
    return Envelope(
        event_id=str(uuid4()), type=event.event_type, version=1, saga_id=SAGA, causation_id=None,
        service=service, step=step, outcome=outcome, occurred_at=T0, payload=event.model_dump_json(),
    )


PLACED = OrderPlaced(order_id="o-1", customer_id="alice", sku="widget", quantity=3, amount=900, address="x")
DECLINED = PaymentDeclined(order_id="o-1", customer_id="alice", amount=900, reason="insufficient funds")


def trigger() -> Envelope:
    return envelope_of(PLACED, service="orders")


def failure() -> Envelope:
    return envelope_of(DECLINED, service="payment", outcome="failed", step="process_payment")


NOTES = {"choreo.EventParked", "choreo.HandlerRetried", "choreo.DeadLetterResolved"}


def types(store: EventStore, service: str) -> list[str]:
    """The types of the events `service` emitted, without choreo's notes about retries and parking."""
    return [e.type for e in store.read(0, 10_000) if e.service == service and e.type not in NOTES]


def stock(store: EventStore) -> int | None:
    item = load_aggregate(store.service("inventory"), inventory.StockItem, "widget")
    return None if item is None else item.on_hand


ARRIVALS = sorted(set(itertools.permutations(["trigger", "failure", "trigger", "failure"])))


@pytest.mark.parametrize("arrival", ARRIVALS, ids="-".join)
def test_compensation_is_correct_in_any_arrival_order_with_duplicates(arrival: tuple[str, ...]) -> None:
    store = InMemoryStore()
    store.append([trigger() if a == "trigger" else failure() for a in arrival])
    Processor(inventory.service, store, batch_size=1).run_until_idle()
    emitted = types(store, "inventory")
    if arrival.index("trigger") < arrival.index("failure"):
        assert emitted == ["ItemsReserved", "ItemsReleased"]  # compensated exactly once
    else:
        assert emitted == ["choreo.StepSkipped"]  # a late trigger is skipped, once
    assert stock(store) in (None, inventory.CATALOG["widget"])


@pytest.mark.parametrize("batch_size", [1, 2, 500])
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_interleavings_hold_on_a_durable_store_in_one_batch_or_many(kind: str, batch_size: int, tmp_path,  # type: ignore[no-untyped-def]
                                                                   request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue("postgres_server") if kind == "postgres" else None
    for n, arrival in enumerate(ARRIVALS):
        store = open_store(cluster.url(cluster.create_database()) if cluster else f"sqlite:///{tmp_path}/i{n}.db")
        store.append([trigger() if a == "trigger" else failure() for a in arrival])
        Processor(inventory.service, store, batch_size=batch_size).run_until_idle()
        emitted = types(store, "inventory")
        expected = (
            ["ItemsReserved", "ItemsReleased"]
            if arrival.index("trigger") < arrival.index("failure")
            else ["choreo.StepSkipped"]
        )
        assert emitted == expected, arrival
        store.close()


def test_failure_from_a_later_step_compensates_every_earlier_participant() -> None:
    store = InMemoryStore()
    reserved = ItemsReserved(**PLACED.model_dump())
    rejected = ShipmentRejected(order_id="o-1", address="x", reason="address undeliverable")
    store.append([
        envelope_of(reserved, service="inventory", outcome="completed", step="reserve_inventory"),
        envelope_of(rejected, service="shipping", outcome="failed", step="create_shipment"),
    ])
    Processor(payment.service, store).run_until_idle()
    assert types(store, "payment") == ["PaymentCaptured", "PaymentRefunded"]
    wallet = load_aggregate(store.service("payment"), payment.Wallet, "alice")
    assert wallet is not None and wallet.balance == payment.RICH


def test_redelivery_of_a_processed_batch_changes_nothing(durable_store) -> None:  # type: ignore[no-untyped-def]
    durable_store.append([trigger()])
    first = Processor(inventory.service, durable_store)
    first.run_until_idle()
    before = (durable_store.read(0, 100), stock(durable_store))
    again = Processor(inventory.service, durable_store)
    again.tracking = {}  # deliver everything again, as after a lost acknowledgement
    again.feed = durable_store.feed("inventory", dict)
    again.run_until_idle()
    assert (durable_store.read(0, 100), stock(durable_store)) == before
    assert again.tracking == durable_store.service("inventory").tracking() == {"log": 2}


def test_the_same_trigger_delivered_under_a_new_id_runs_the_step_once(any_store: EventStore) -> None:
    any_store.append([trigger(), trigger(), trigger()])
    Processor(inventory.service, any_store).run_until_idle()
    assert types(any_store, "inventory") == ["ItemsReserved"]
    assert stock(any_store) == inventory.CATALOG["widget"] - 3


class Crash(BaseException):
    """Stands for the process dying between the handler and the commit."""


def test_a_crash_between_handler_and_commit_reruns_the_handler_once(durable_store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    durable_store.append([trigger()])
    calls = []
    real_reserve = inventory.service.steps["reserve_inventory"].fn

    def counting(event, ctx):  # type: ignore[no-untyped-def]
        calls.append(event.order_id)
        return real_reserve(event, ctx)

    monkeypatch.setitem(
        inventory.service.steps, "reserve_inventory",
        inventory.service.steps["reserve_inventory"].__class__("step", counting, OrderPlaced, "reserve_inventory"),
    )
    monkeypatch.setitem(inventory.service.handlers, "OrderPlaced", [inventory.service.steps["reserve_inventory"]])
    crashing = Processor(inventory.service, durable_store)
    real_commit = crashing.own.commit

    def crash(**kwargs):  # type: ignore[no-untyped-def]
        raise Crash

    monkeypatch.setattr(crashing.own, "commit", crash)
    with pytest.raises(Crash):
        crashing.poll()
    assert durable_store.read(0, 10) == durable_store.read(0, 1)  # nothing was written
    monkeypatch.setattr(crashing.own, "commit", real_commit)
    Processor(inventory.service, durable_store).run_until_idle()  # the restarted service
    assert calls == ["o-1", "o-1"]
    assert types(durable_store, "inventory") == ["ItemsReserved"]
    assert stock(durable_store) == inventory.CATALOG["widget"] - 3


def test_undecodable_events_are_parked_and_other_sagas_flow(any_store: EventStore) -> None:
    bad = Envelope(
        event_id="bad-1", type="OrderPlaced", version=1, saga_id="poisoned", causation_id=None,
        service="orders", step=None, outcome=None, occurred_at=T0, payload='{"order_id": 5}',
    )
    later = Envelope(**{**bad.to_dict(), "event_id": "bad-2", "payload": PLACED.model_dump_json(),
                        "occurred_at": T0, "position": None})
    unknown = Envelope(**{**bad.to_dict(), "event_id": "u-1", "type": "NoSuchEvent", "saga_id": "other",
                          "payload": "{}", "occurred_at": T0, "position": None})
    any_store.append([bad, trigger(), later, unknown])
    Processor(inventory.service, any_store).run_until_idle()
    parked = any_store.service("inventory").dead_letters()
    assert [(d.event_id, d.saga_id) for d in parked] == [("bad-1", "poisoned"), ("bad-2", "poisoned"), ("u-1", "other")]
    assert "OrderPlaced.order_id" in parked[0].reason
    assert parked[1].reason.startswith("held behind")
    assert "unknown event type 'NoSuchEvent'" in parked[2].reason  # it may be meant for it: parked, not dropped
    assert types(any_store, "inventory") == ["ItemsReserved"]  # the good saga went on
    notes = [e for e in any_store.read(0, 100) if e.type == "choreo.EventParked"]
    assert [(n.saga_id, n.causation_id) for n in notes] == [("poisoned", "bad-1"), ("poisoned", "bad-2"), ("other", "u-1")]


def test_a_handler_that_keeps_failing_is_parked_after_its_retries(any_store: EventStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from choreo import RetryPolicy

    def boom(event, ctx):  # type: ignore[no-untyped-def]
        raise TimeoutError("provider timed out")

    handler = inventory.service.steps["reserve_inventory"].__class__("step", boom, OrderPlaced, "reserve_inventory")
    monkeypatch.setitem(inventory.service.handlers, "OrderPlaced", [handler])
    any_store.append([trigger()])
    Processor(inventory.service, any_store, retry=RetryPolicy(max_attempts=3, base_delay=0.001)).run_until_idle()
    (parked,) = any_store.service("inventory").dead_letters()
    assert parked.attempts == 3 and "TimeoutError: provider timed out" in parked.reason
    assert any_store.service("inventory").position() == 1


def test_the_example_system_is_wired() -> None:
    assert set(services.system.step_owners) == set(services.ORDER_SAGA.steps)


def test_creating_an_aggregate_whose_key_is_taken_is_parked_with_a_clear_reason(any_store: EventStore) -> None:
    from choreo import RetryPolicy
    from services import orders

    first = envelope_of(PLACED, service="orders")
    again = Envelope(**{**first.to_dict(), "event_id": "other", "payload": first.payload,
                        "occurred_at": T0, "position": None, "source": "log"})
    any_store.append([first, again])  # the saga is started twice under different event ids
    Processor(orders.service, any_store, retry=RetryPolicy(max_attempts=2, base_delay=0.001)).run_until_idle()
    (parked,) = any_store.service("orders").dead_letters()
    assert parked.event_id == "other" and "AggregateExists" in parked.reason
    assert f"a Order with key {SAGA!r} already exists" in parked.reason


def test_an_aggregate_created_by_an_earlier_process_is_found_when_created_again(any_store: EventStore) -> None:
    from choreo import RetryPolicy
    from choreo.aggregates import load_aggregate
    from services import orders

    first = envelope_of(PLACED, service="orders")
    any_store.append([first])
    Processor(orders.service, any_store).run_until_idle()
    again = Envelope(**{**first.to_dict(), "event_id": "other", "payload": first.payload,
                        "occurred_at": T0, "position": None, "source": "log"})
    any_store.append([again])  # a new process (nothing cached) sees the saga started again
    Processor(orders.service, any_store, retry=RetryPolicy(max_attempts=2, base_delay=0.001)).run_until_idle()
    (parked,) = any_store.service("orders").dead_letters()
    assert parked.event_id == "other" and f"a Order with key {SAGA!r} already exists" in parked.reason
    order = load_aggregate(any_store.service("orders"), orders.Order, SAGA)
    assert order is not None and order.version == 1  # the order was not created twice
