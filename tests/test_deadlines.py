"""Durable deadlines, driven by the clock (freezegun): once, on time, never after cancellation, late after downtime."""

from __future__ import annotations

from datetime import timedelta

from freezegun import freeze_time

from choreo import Runner, clock, open_store
from services import orders, system
from services.checks import read_facts
from services.contracts import OrderPlaced

DUE = orders.FULFILMENT_DEADLINE
ALL_BUT_SHIPPING = ["orders", "inventory", "payment", "notification"]


def placed() -> OrderPlaced:
    return OrderPlaced(order_id="o-1", customer_id="c-1", sku="widget", quantity=1, amount=100, address="1 Main St")


def timeouts(store) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.event_id for batch in store.scan() for e in batch if e.type == "OrderTimedOut"]


def test_fires_once_at_its_time_and_the_saga_compensates(durable_url: str) -> None:
    store = open_store(durable_url)
    with freeze_time("2026-03-01 12:00:00") as frozen:
        runner = Runner(system, store, services=ALL_BUT_SHIPPING)  # shipping is down: the saga stalls
        saga = runner.start(placed())
        runner.run_until_idle()
        frozen.tick(DUE - timedelta(seconds=1))
        runner.run_until_idle()
        assert timeouts(store) == []  # not yet
        frozen.tick(timedelta(seconds=2))
        runner.run_until_idle()
        assert len(timeouts(store)) == 1
        frozen.tick(DUE * 3)
        runner.run_until_idle()
        assert len(timeouts(store)) == 1  # exactly once
        Runner(system, store).run_until_idle()  # shipping comes back: ships, reads the timeout, undoes it
    facts = read_facts(store)[saga]
    assert facts.state == "failed" and facts.cause == "fulfilment deadline passed"
    assert facts.compensated == {"reserve_inventory", "process_payment", "create_shipment"}
    assert len(timeouts(store)) == 1
    store.close()


def test_does_not_fire_after_the_saga_ended(durable_url: str) -> None:
    store = open_store(durable_url)
    with freeze_time("2026-03-01 12:00:00") as frozen:
        runner = Runner(system, store)
        saga = runner.start(placed())
        runner.run_until_idle()
        assert read_facts(store)[saga].state == "completed"
        frozen.tick(DUE * 2)
        runner.run_until_idle()
    assert timeouts(store) == []
    assert store.service("orders").due_deadlines(clock.now() + DUE * 5) == []  # cancelled, not pending
    store.close()


def test_fires_late_after_a_restart_past_its_time(durable_url: str) -> None:
    url = durable_url
    with freeze_time("2026-03-01 12:00:00") as frozen:
        store = open_store(url)
        runner = Runner(system, store, services=ALL_BUT_SHIPPING)
        saga = runner.start(placed())
        runner.run_until_idle()
        store.close()  # every service goes down
        frozen.tick(DUE * 10)  # ... for a long time
        store = open_store(url)
        assert timeouts(store) == []
        Runner(system, store, services=ALL_BUT_SHIPPING).run_until_idle()  # back up: it fires, late
        assert len(timeouts(store)) == 1
        Runner(system, store, services=ALL_BUT_SHIPPING).run_until_idle()  # another restart: not again
        assert len(timeouts(store)) == 1
        Runner(system, store).run_until_idle()  # shipping too
        assert len(timeouts(store)) == 1
    assert read_facts(store)[saga].state == "failed"
    store.close()
