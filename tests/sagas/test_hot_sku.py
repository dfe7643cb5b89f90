"""A hot SKU: a thousand sagas reserve from one stock item at once (guarantee 10).

The stock service handles 64 sagas at once, and its reserve step is `async def`: it
reads the stock, awaits (the race window of a read-modify-write), then reserves. Every
saga's reservation goes through the one `HotStock` aggregate, so the sagas contend for
it. Whatever the interleaving, the effects must be those of some serial order: the
stock ends exact and never negative, exactly min(stock, demand) reservations succeed,
and every other saga fails with out-of-stock and compensates its earlier step (the
cart hold), once.

The system is built here (not the example's `services/`): shop starts and ends the
saga; cart holds the order (step 1, compensated by releasing the hold); stock reserves
(step 2, may fail with `HotOutOfStock`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo import (
    Aggregate, Context, EventStore, Runner, SagaCompleted, SagaDefinition, SagaFailed, Service, StepFailed, System,
    event, open_store,
)
from choreo.aggregates import load_aggregate
from choreo.events import Envelope, Event

DEMAND = 1000  # sagas, one unit each
SKU = "hot-sku"


class HotOrdered(Event):
    order_id: str
    sku: str
    quantity: int


class HotCartHeld(Event):
    order_id: str
    sku: str
    quantity: int


class HotCartReleased(Event):
    order_id: str


class HotReserved(Event):
    order_id: str
    sku: str
    quantity: int


class HotOutOfStock(Event):
    order_id: str
    sku: str
    requested: int
    available: int


class HotStockReleased(Event):
    order_id: str
    quantity: int


class HotOrderAccepted(Event):
    order_id: str


class HotOrderRejected(Event):
    order_id: str
    failure_type: str
    compensated: list[str]


class HotStock(Aggregate):
    """The stock of one SKU and what each order reserved; it refuses to go negative."""

    @event("Stocked")
    def __init__(self, sku: str, on_hand: int) -> None:
        self.sku = sku
        self.on_hand = on_hand
        self.reserved: dict[str, int] = {}

    @event("Reserved")
    def reserve(self, order_id: str, quantity: int) -> None:
        if quantity > self.on_hand or order_id in self.reserved:
            raise ValueError(f"stock of {self.sku} would go negative, or {order_id} reserved twice")
        self.on_hand -= quantity
        self.reserved[order_id] = quantity

    @event("Released")
    def release(self, order_id: str) -> None:
        self.on_hand += self.reserved.pop(order_id)


class CartHold(Aggregate):
    @event("Held")
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.released = False

    @event("Released")
    def release(self) -> None:
        if self.released:
            raise ValueError("released twice")
        self.released = True


HOT_SAGA = SagaDefinition(name="hot_order", start=HotOrdered, steps=("hold_cart", "reserve_stock"),
                          end=(HotOrderAccepted, HotOrderRejected))


class Probe:
    """What the reserve handler saw: calls, and how many ran at once (to show the sagas overlapped)."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.peak = 0


def hot_system(stock: int, probe: Probe) -> System:
    shop = Service("shop", starts=[HotOrdered])
    cart = Service("cart")
    warehouse = Service("stock", concurrency=64)

    @shop.saga_completed(HOT_SAGA)
    def accepted(done: SagaCompleted, ctx: Context) -> HotOrderAccepted:
        return HotOrderAccepted(order_id=ctx.saga_id)

    @shop.saga_failed(HOT_SAGA)
    def rejected(failed: SagaFailed, ctx: Context) -> HotOrderRejected:
        return HotOrderRejected(order_id=ctx.saga_id, failure_type=failed.failure_type, compensated=failed.compensated)

    @cart.step("hold_cart", on=HotOrdered)
    def hold(order: HotOrdered, ctx: Context) -> HotCartHeld:
        ctx.create(CartHold, order.order_id, order_id=order.order_id)
        return HotCartHeld(order_id=order.order_id, sku=order.sku, quantity=order.quantity)

    @cart.compensation("hold_cart")
    def unhold(done: HotCartHeld, ctx: Context) -> HotCartReleased:
        ctx.load(CartHold, done.order_id).release()
        return HotCartReleased(order_id=done.order_id)

    @warehouse.step("reserve_stock", on=HotCartHeld)
    async def reserve(held: HotCartHeld, ctx: Context) -> HotReserved:
        probe.calls += 1
        probe.running += 1
        probe.peak = max(probe.peak, probe.running)
        try:
            item = ctx.find(HotStock, held.sku) or ctx.create(HotStock, held.sku, sku=held.sku, on_hand=stock)
            available = item.on_hand  # read ...
            await asyncio.sleep(0.001)  # ... wait on something (the race window) ...
            if held.quantity > available:  # ... and decide on what was read
                raise StepFailed(HotOutOfStock(order_id=held.order_id, sku=held.sku, requested=held.quantity,
                                               available=available))
            item.reserve(held.order_id, held.quantity)
            return HotReserved(order_id=held.order_id, sku=held.sku, quantity=held.quantity)
        finally:
            probe.running -= 1

    @warehouse.compensation("reserve_stock")
    def unreserve(done: HotReserved, ctx: Context) -> HotStockReleased:  # never needed: the last step
        ctx.load(HotStock, done.sku).release(done.order_id)
        return HotStockReleased(order_id=done.order_id, quantity=done.quantity)

    return System([shop, cart, warehouse], sagas=[HOT_SAGA])


def start_all(system: System, store: EventStore) -> list[str]:
    ids = [f"hot-{i:04d}" for i in range(DEMAND)]
    system.start_many(store, [(HotOrdered(order_id=s, sku=SKU, quantity=1), s) for s in ids])
    return ids


def log_of(store: EventStore) -> list[Envelope]:
    """The log once: a copy of an event (Kafka: the relay sent it again after a crash) counts once."""
    seen: set[str] = set()
    out = []
    for batch in store.scan():
        for env in batch:
            if env.event_id not in seen:
                seen.add(env.event_id)
                out.append(env)
    return out


ENDS = {HotOrderAccepted.event_type, HotOrderRejected.event_type}


def check(store: EventStore, ids: list[str], stock: int, probe: Probe) -> None:
    log = log_of(store)
    by_saga: dict[str, Counter[str]] = defaultdict(Counter)
    for env in log:
        by_saga[env.saga_id][env.type] += 1
    ends = {s: [t for t in ENDS if by_saga[s][t]] for s in ids}
    assert all(sum(by_saga[s][t] for t in ENDS) == 1 for s in ids), "a saga ended twice or never"
    accepted = sorted(s for s in ids if ends[s] == [HotOrderAccepted.event_type])
    rejected = sorted(s for s in ids if ends[s] == [HotOrderRejected.event_type])
    expected_ok = min(stock, DEMAND)
    assert len(accepted) == expected_ok and len(rejected) == DEMAND - expected_ok

    for s in accepted:  # reserved once, never released, its cart hold kept
        assert by_saga[s]["HotReserved"] == 1 and by_saga[s]["HotOutOfStock"] == 0
        assert by_saga[s]["HotCartReleased"] == 0 and by_saga[s]["HotStockReleased"] == 0
    for s in rejected:  # out of stock, its cart hold released exactly once
        assert by_saga[s]["HotReserved"] == 0 and by_saga[s]["HotOutOfStock"] == 1
        assert by_saga[s]["HotCartReleased"] == 1
    reasons = {env.saga_id: env.decode() for env in log if env.type == HotOrderRejected.event_type}
    assert all(r.failure_type == "HotOutOfStock" and r.compensated == ["hold_cart"]  # type: ignore[attr-defined]
               for r in reasons.values())

    item = load_aggregate(store.service("stock"), HotStock, SKU)
    assert item is not None
    assert item.on_hand == stock - expected_ok >= 0  # exact, never negative
    assert sorted(item.reserved) == accepted  # the reservations are the accepted orders', once each
    assert item.version == 1 + expected_ok  # Stocked, then one Reserved per accepted order: nothing lost
    for name in ("shop", "cart", "stock"):
        assert store.service(name).dead_letters(None) == [], name
    # the sagas really overlapped: a reserve ran while another held the SKU (and was run again after it)
    assert probe.peak > 1 and probe.calls > DEMAND


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[EventStore]:
    store = open_store(f"sqlite:///{tmp_path}/hot.db")
    yield store
    store.close()


@pytest.mark.parametrize("stock", [300, DEMAND + 200], ids=["scarce", "ample"])
def test_a_hot_sku_on_sqlite_ends_exact(stock: int, sqlite_file: EventStore) -> None:
    probe = Probe()
    system = hot_system(stock, probe)
    ids = start_all(system, sqlite_file)
    Runner(system, sqlite_file).run_until_idle()  # the stock service reads the 1,000 holds in one batch
    check(sqlite_file, ids, stock, probe)


@pytest.mark.slow
def test_a_hot_sku_on_sqlite_with_a_thread_per_service_ends_exact(sqlite_file: EventStore) -> None:
    probe = Probe()
    system = hot_system(300, probe)
    with Runner(system, sqlite_file, batch_size=200):  # smaller batches: the holds arrive while stock runs
        ids = start_all(system, sqlite_file)
        wait_for_ends(sqlite_file, ids)
    check(sqlite_file, ids, 300, probe)


def wait_for_ends(store: EventStore, ids: list[str], timeout: float = 45.0) -> None:
    watch = store.feed("hot-watch", dict, group=False)
    ended: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(ended) < len(ids):
            assert time.monotonic() < deadline, f"only {len(ended)} of {len(ids)} sagas ended"
            ended.update(e.saga_id for e in watch.poll(5000, 0.2) if e.type in ENDS)
    finally:
        watch.close()


@pytest.mark.slow
def test_a_hot_sku_on_kafka_ends_exact(kafka_url: str) -> None:
    store = open_store(kafka_url)
    probe = Probe()
    system = hot_system(300, probe)
    try:
        with Runner(system, store):
            ids = start_all(system, store)
            wait_for_ends(store, ids)
        check(store, ids, 300, probe)
    finally:
        store.close()
