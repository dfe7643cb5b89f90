"""End-to-end scenarios of the order-fulfilment saga, in memory."""

from __future__ import annotations

import pytest

import services
from choreo.testing import TestSystem
from services.contracts import OrderPlaced


def order(**changes: object) -> OrderPlaced:
    data: dict[str, object] = dict(
        order_id="o-1", customer_id="alice", sku="widget", quantity=2, amount=1500, address="1 Main St"
    )
    data.update(changes)
    return OrderPlaced(**data)  # type: ignore[arg-type]


@pytest.fixture
def harness() -> TestSystem:
    return TestSystem(services.system)


def test_happy_path_runs_every_step_and_confirms(harness: TestSystem) -> None:
    saga = harness.start(order())
    harness.run()
    assert harness.types(saga) == [
        "OrderPlaced", "ItemsReserved", "PaymentCaptured", "ShipmentCreated",
        "ConfirmationSent", "choreo.SagaCompleted", "OrderConfirmed",
    ]
    steps = [(e.step, e.outcome) for e in harness.envelopes(saga) if e.step]
    assert steps == [
        ("reserve_inventory", "completed"), ("process_payment", "completed"),
        ("create_shipment", "completed"), ("send_confirmation", "completed"),
    ]


def test_out_of_stock_cancels_with_nothing_to_undo(harness: TestSystem) -> None:
    saga = harness.start(order(sku="rare-gem"))
    harness.run()
    assert harness.types(saga) == ["OrderPlaced", "OutOfStock", "choreo.SagaFailed", "OrderCancelled"]
    assert harness.events(saga)[-1].reason == "reserve_inventory: out of stock"  # type: ignore[attr-defined]


def test_declined_payment_releases_the_reservation(harness: TestSystem) -> None:
    saga = harness.start(order(customer_id="broke-1"))
    harness.run()
    assert harness.types(saga) == [
        "OrderPlaced", "ItemsReserved", "PaymentDeclined", "ItemsReleased", "choreo.SagaFailed", "OrderCancelled",
    ]
    cancelled = harness.events(saga)[-1]
    assert cancelled.compensated == ["reserve_inventory"]  # type: ignore[attr-defined]


def test_undeliverable_address_refunds_and_releases(harness: TestSystem) -> None:
    saga = harness.start(order(address="nowhere"))
    harness.run()
    types = harness.types(saga)
    assert types[:4] == ["OrderPlaced", "ItemsReserved", "PaymentCaptured", "ShipmentRejected"]
    assert sorted(types[4:6]) == ["ItemsReleased", "PaymentRefunded"]
    assert types[-1] == "OrderCancelled"
    compensations = [e for e in harness.envelopes(saga) if e.outcome == "compensated"]
    assert {e.step for e in compensations} == {"reserve_inventory", "process_payment"}


def test_correlation_and_causation_are_filled_by_the_framework(harness: TestSystem) -> None:
    sagas = [harness.start(order(order_id=f"o-{i}", address="nowhere" if i % 2 else "x")) for i in range(6)]
    harness.run()
    log = harness.envelopes()
    by_id = {e.event_id: e for e in log}
    assert len(by_id) == len(log)
    for e in log:
        if e.causation_id is None:
            assert e.type == "OrderPlaced" and e.saga_id in sagas
            continue
        cause = by_id[e.causation_id]
        assert cause.saga_id == e.saga_id
        assert (cause.position or 0) < (e.position or 0)


def test_starting_the_same_saga_id_twice_is_a_no_op(harness: TestSystem) -> None:
    harness.start(order(), saga_id="saga-1")
    harness.start(order(), saga_id="saga-1")
    harness.run()
    assert harness.types("saga-1").count("OrderPlaced") == 1
    assert harness.types("saga-1")[-1] == "OrderConfirmed"
