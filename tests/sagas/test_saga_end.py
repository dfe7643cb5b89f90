"""Guarantee 9: the service that starts a saga learns, exactly once, that it completed or failed.

The orders service of the example ends its sagas through `@service.saga_completed` and
`@service.saga_failed`; these tests feed it the outcomes of real sagas in every order,
twice over, and check deadlines against a backlog and against a saga that is stuck.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from freezegun import freeze_time

import services
from choreo import (
    CompensationForced, Context, Envelope, Event, InMemoryStore, Processor, Runner, SagaCompleted,
    SagaDefinition, SagaFailed, Service, StepFailed, System, WiringError, open_store,
)
from choreo.testing import TestSystem
from services import orders, system
from services.checks import check_invariants, read_facts
from services.contracts import OrderPlaced

ENDS = ("choreo.SagaCompleted", "choreo.SagaFailed", "OrderConfirmed", "OrderCancelled")


def order(**changes: object) -> OrderPlaced:
    data: dict[str, object] = dict(
        order_id="o-1", customer_id="alice", sku="widget", quantity=2, amount=1500, address="1 Main St"
    )
    data.update(changes)
    return OrderPlaced(**data)  # type: ignore[arg-type]


def real_saga(**changes: object) -> list[Envelope]:
    """The log of one real saga, run by the whole example system in memory."""
    harness = TestSystem(services.system)
    saga = harness.start(order(**changes))
    harness.run()
    return harness.envelopes(saga)


def outcomes_of(log: list[Envelope]) -> list[Envelope]:
    """The step outcomes other services emitted (what the orders service learns from)."""
    return [e for e in log if e.service != "orders" and e.outcome]


def copy(env: Envelope) -> Envelope:
    """The same event delivered again under another id (a step that ran twice, say)."""
    return replace(env, event_id=str(uuid4()), position=None)


def ends_seen_by_orders(start: Envelope, arrivals: list[Envelope], batch_size: int) -> list[str]:
    store = InMemoryStore()
    store.append([replace(start, position=None), *[replace(e, position=None) for e in arrivals]])
    Processor(orders.service, store, batch_size=batch_size).run_until_idle()
    return [e.type for e in store.read(0, 10_000) if e.type in ENDS]


HAPPY = real_saga()
DECLINED = real_saga(customer_id="broke-1")


@pytest.mark.parametrize("batch_size", [1, 500])
def test_completed_exactly_once_in_any_order_with_duplicates(batch_size: int) -> None:
    start, steps = HAPPY[0], outcomes_of(HAPPY)
    assert [e.step for e in steps] == list(orders.ORDER_SAGA.steps)
    for arrival in itertools.permutations(steps):
        seen = ends_seen_by_orders(start, [*arrival, copy(arrival[0]), copy(arrival[-1])], batch_size)
        assert seen == ["choreo.SagaCompleted", "OrderConfirmed"], arrival


@pytest.mark.parametrize("batch_size", [1, 500])
def test_failed_exactly_once_only_after_every_completed_step_is_compensated(batch_size: int) -> None:
    start, outcomes = DECLINED[0], outcomes_of(DECLINED)
    assert [(e.step, e.outcome) for e in outcomes] == [
        ("reserve_inventory", "completed"), ("process_payment", "failed"), ("reserve_inventory", "compensated")]
    for arrival in itertools.permutations(outcomes):
        store = InMemoryStore()
        store.append([replace(e, position=None) for e in (start, *arrival, copy(arrival[1]))])
        Processor(orders.service, store, batch_size=batch_size).run_until_idle()
        log = store.read(0, 10_000)
        types = [e.type for e in log if e.type in ENDS]
        assert types == ["choreo.SagaFailed", "OrderCancelled"], arrival
        failed = next(e for e in log if e.type == "choreo.SagaFailed")
        needed = {o.event_id for o in outcomes if o.outcome != "completed"}  # a compensation implies it
        assert (failed.position or 0) > max(e.position or 0 for e in log if e.event_id in needed)
        event = failed.decode()
        assert isinstance(event, SagaFailed)
        assert event.failed_step == "process_payment" and event.failure_type == "PaymentDeclined"
        assert event.compensated == ["reserve_inventory"] and event.reason == "insufficient funds"
        cancelled = next(e for e in log if e.type == "OrderCancelled").decode()
        assert cancelled.reason == "process_payment: payment declined"  # type: ignore[attr-defined]


def forced_failure(saga_id: str) -> Envelope:
    event = CompensationForced(reason="operator")
    return Envelope(event_id=str(uuid4()), type=event.event_type, version=1, saga_id=saga_id, causation_id=None,
                    service="operator", step=None, outcome="failed", occurred_at=HAPPY[0].occurred_at,
                    payload=event.model_dump_json())


@pytest.mark.parametrize("at", range(5))
def test_never_both_when_a_failure_races_the_completions(at: int) -> None:
    start, steps = HAPPY[0], outcomes_of(HAPPY)
    arrivals = [*steps[:at], forced_failure(start.saga_id), *steps[at:]]
    seen = ends_seen_by_orders(start, arrivals, batch_size=500)
    if at == len(steps):  # the saga had completed before the failure came: it stays completed
        assert seen == ["choreo.SagaCompleted", "OrderConfirmed"]
    else:  # it can no longer complete; it fails once the participants compensate (not in this log)
        assert seen == []


def test_the_projection_shows_choreos_end() -> None:
    harness = TestSystem(services.system)
    done, failed = harness.start(order()), harness.start(order(order_id="o-2", sku="rare-gem"))
    harness.run()
    from choreo import SagaProjection

    projection = SagaProjection(harness.store, sagas=services.system.sagas)
    projection.update()
    assert projection.get(done)["state"] == "completed"  # type: ignore[index]
    assert projection.get(failed)["state"] == "failed"  # type: ignore[index]


# -- deadlines and the backlog ------------------------------------------------------------
DUE = orders.FULFILMENT_DEADLINE
OTHERS = ["inventory", "payment", "shipping", "notification"]


def count(store, kind: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for batch in store.scan() for e in batch if e.type == kind)


@pytest.mark.parametrize("batch_size", [1, 1000])
def test_a_saga_that_completed_while_orders_was_down_is_confirmed_not_timed_out(
    tmp_path: Path, batch_size: int
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/down.db")
    with freeze_time("2026-03-01 12:00:00") as frozen:
        saga = system.start(store, order())
        Runner(system, store, services=["orders"]).run_until_idle()  # the deadline is scheduled
        frozen.tick(DUE + timedelta(minutes=5))  # orders goes down past the deadline...
        Runner(system, store, services=OTHERS).run_until_idle()  # ...while the others complete the saga
        assert count(store, "ConfirmationSent") == 1
        Runner(system, store, services=["orders"], batch_size=batch_size).run_until_idle()  # orders comes back
        frozen.tick(DUE * 3)
        Runner(system, store).run_until_idle()
    assert count(store, "OrderTimedOut") == 0 and count(store, "CompensationForced") == 0
    assert count(store, "OrderConfirmed") == 1 and count(store, "OrderCancelled") == 0
    facts = read_facts(store)
    assert facts[saga].state == "completed" and facts[saga].compensated == set()
    assert all(check_invariants(store, facts).values()), check_invariants(store, facts)
    store.close()


def test_a_saga_really_stuck_times_out_once_and_compensates(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/stuck.db")
    with freeze_time("2026-03-01 12:00:00") as frozen:
        up = Runner(system, store, services=["orders", "inventory", "payment", "notification"])  # shipping is down
        saga = up.start(order())
        up.run_until_idle()
        frozen.tick(DUE + timedelta(seconds=1))
        up.run_until_idle()
        frozen.tick(DUE * 3)
        up.run_until_idle()
        assert count(store, "OrderTimedOut") == 1 and count(store, "ItemsReleased") == 1
        # shipping may have created the shipment before it reads the timeout: the saga waits for it
        assert count(store, "choreo.SagaFailed") == 0
        Runner(system, store).run_until_idle()  # shipping comes back: it ships, reads the timeout, undoes it
    assert count(store, "OrderTimedOut") == 1
    assert count(store, "choreo.SagaFailed") == 1 and count(store, "OrderCancelled") == 1
    assert count(store, "choreo.SagaCompleted") == 0 and count(store, "OrderConfirmed") == 0
    facts = read_facts(store)
    assert facts[saga].state == "failed" and facts[saga].cause == "fulfilment deadline passed"
    assert facts[saga].compensated == {"reserve_inventory", "process_payment", "create_shipment"}
    assert all(check_invariants(store, facts).values()), check_invariants(store, facts)
    store.close()


# -- a small system of its own ------------------------------------------------------------
class Requested(Event):
    key: str


class Prepared(Event):
    key: str


class Delivered(Event):
    key: str


class DeliveryFailed(Event):
    key: str
    reason: str


class Late(Event):
    key: str
    reason: str


def courier_system(fail: bool, compensation: str) -> tuple[System, list[object]]:
    ended: list[object] = []
    desk = Service("desk", starts=[Requested])
    kitchen = Service("kitchen")
    courier = Service("courier")
    saga = SagaDefinition(name="delivery", start=Requested, steps=("prepare", "deliver"))

    @kitchen.step("prepare", on=Requested)
    def prepare(event: Requested, ctx: Context) -> Prepared:
        return Prepared(key=event.key)

    if compensation == "returns nothing":
        @kitchen.compensation("prepare")
        def unprepare(done: Prepared, ctx: Context) -> None:
            return None

    @courier.step("deliver", on=Prepared)
    def deliver(event: Prepared, ctx: Context) -> Delivered:
        if fail:
            raise StepFailed(DeliveryFailed(key=event.key, reason="no driver"))
        return Delivered(key=event.key)

    @courier.deadline("late", start_on=Requested, after=timedelta(hours=1))
    def late(event: Requested, ctx: Context) -> Late:
        return Late(key=event.key, reason="late")

    @desk.saga_completed(saga)
    def completed(done: SagaCompleted, ctx: Context) -> None:
        ended.append(done)

    @desk.saga_failed(saga)
    def failed(outcome: SagaFailed, ctx: Context) -> None:
        ended.append(outcome)

    return System([desk, kitchen, courier], sagas=[saga]), ended


@pytest.mark.parametrize("compensation", ["none registered", "returns nothing"])
def test_a_step_with_nothing_to_undo_still_lets_the_saga_fail(compensation: str) -> None:
    courier, ended = courier_system(fail=True, compensation=compensation)
    harness = TestSystem(courier)
    saga = harness.start(Requested(key="k"))
    harness.run()
    (failed,) = ended
    assert isinstance(failed, SagaFailed) and failed.compensated == ["prepare"] and failed.failed_step == "deliver"
    marks = [e for e in harness.envelopes(saga) if e.type == "choreo.StepCompensated"]
    assert [(e.step, e.outcome, e.service) for e in marks] == [("prepare", "compensated", "kitchen")]


def test_a_participants_deadline_is_cancelled_when_the_saga_ends() -> None:
    courier, ended = courier_system(fail=False, compensation="none registered")
    with freeze_time("2026-03-01 12:00:00") as frozen:
        harness = TestSystem(courier)
        saga = harness.start(Requested(key="k"))
        harness.run()
        frozen.tick(timedelta(hours=2))
        harness.run()
    assert [type(e) for e in ended] == [SagaCompleted]
    assert "Late" not in harness.types(saga)


def test_end_handlers_are_wired_only_by_the_starter_and_once() -> None:
    saga = SagaDefinition(name="delivery", start=Requested, steps=("prepare",))
    with pytest.raises(WiringError, match="does not start saga 'delivery'"):
        Service("other").saga_completed(saga)
    desk = Service("desk", starts=[Requested])
    desk.saga_failed(saga)(lambda e, ctx: None)
    with pytest.raises(WiringError, match="two failed handlers"):
        desk.saga_failed(saga)(lambda e, ctx: None)


def test_async_end_handlers_are_awaited() -> None:
    ended: list[object] = []
    desk = Service("desk", starts=[Requested])
    kitchen = Service("kitchen")
    saga = SagaDefinition(name="delivery", start=Requested, steps=("prepare",))

    @kitchen.step("prepare", on=Requested)
    async def prepare(event: Requested, ctx: Context) -> Prepared:
        return Prepared(key=event.key)

    @desk.saga_completed(saga)
    async def completed(done: SagaCompleted, ctx: Context) -> None:
        ended.append(done)

    harness = TestSystem(System([desk, kitchen], sagas=[saga]))
    harness.start(Requested(key="k"))
    harness.run()
    assert [type(e) for e in ended] == [SagaCompleted]
