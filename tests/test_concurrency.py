"""Guarantee 10: concurrency keeps the semantics.

A service with `async def` handlers handles up to `concurrency` sagas of a batch at once,
and one with `threads` runs its plain handlers in a pool. These tests run the same
scenarios one saga at a time (concurrency 1) and many at once (concurrency 64; a pool of
8 threads), and check that guarantees 1-9 hold unchanged: compensation in any arrival
order, exactly-once effect, each saga's events in log order, serializable effects on a
shared aggregate (`Busy` re-runs), a failing handler that takes nothing of the other
sagas with it, non-blocking durable retries, and kill -9 of a concurrent service process.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Generator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from freezegun import freeze_time

from choreo import Aggregate, Context, EventStore, InMemoryStore, Processor, RetryPolicy, Service, StepFailed, event
from choreo import open_store
from choreo.aggregates import load_aggregate
from choreo.events import Envelope, Event
from choreo.operations import request_retry
from choreo.store import HOLDING, RETRYING
from services import inventory
from services.contracts import OrderPlaced, PaymentDeclined
from tests import async_system
from tests.test_processor import ARRIVALS, NOTES

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parents[1]


# == helpers ===================================================================================

def envelope(ev: Event, saga: str, *, service: str = "orders", step: str | None = None,
             outcome: str | None = None) -> Envelope:
    return Envelope(
        event_id=str(uuid4()), type=ev.event_type, version=ev.schema_version, saga_id=saga, causation_id=None,
        service=service, step=step, outcome=outcome, occurred_at=T0, payload=ev.model_dump_json(),
    )


def interleave(chains: list[list[Envelope]], rng: random.Random) -> list[Envelope]:
    """A random merge of the sagas' event chains that keeps each chain's order."""
    queues = [list(c) for c in chains if c]
    out: list[Envelope] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def emitted(store: EventStore, service: str, saga: str | None = None) -> list[str]:
    """The types of the events `service` emitted (of one saga, if given), without choreo's notes."""
    return [e.type for e in store.read(0, 100_000)
            if e.service == service and e.type not in NOTES and (saga is None or e.saga_id == saga)]


def run(service: Service, store: EventStore, **options: Any) -> Processor:
    processor = Processor(service, store, **options)
    try:
        processor.run_until_idle()
    finally:
        processor.close()
    return processor


Body = Callable[..., Generator[float, None, Any]]


def as_async(body: Body) -> Callable[..., Any]:
    """An `async def` handler that runs `body`, awaiting `asyncio.sleep` for each pause it yields."""
    async def handler(ev: Event, ctx: Context) -> Any:
        steps = body(ev, ctx)
        while True:
            try:
                pause = steps.send(None)
            except StopIteration as done:
                return done.value
            await asyncio.sleep(pause)
    handler.__qualname__ = body.__qualname__
    return handler


def as_blocking(body: Body) -> Callable[..., Any]:
    """A plain handler that runs `body`, blocking in `time.sleep` for each pause it yields."""
    def handler(ev: Event, ctx: Context) -> Any:
        steps = body(ev, ctx)
        while True:
            try:
                pause = steps.send(None)
            except StopIteration as done:
                return done.value
            time.sleep(pause)
    handler.__qualname__ = body.__qualname__
    return handler


#: How a service runs: (its handlers' wrapper, Service options, Processor options).
MODES: dict[str, tuple[Callable[[Body], Callable[..., Any]], dict[str, int], dict[str, int]]] = {
    "serial": (as_async, {}, {"concurrency": 1}),  # async handlers, one saga at a time
    "async-c64": (as_async, {"concurrency": 64}, {}),  # async handlers, 64 sagas at once
    "threads8": (as_blocking, {"threads": 8}, {}),  # blocking plain handlers in 8 threads, 8 sagas at once
}


class Probe:
    """What handlers saw: calls, how many ran at once, and the order of the runs that will merge."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[object] = Counter()
        self.running = 0
        self.peak = 0
        self.seen: list[tuple[str, int]] = []

    def enter(self, key: object = None) -> int:
        with self.lock:
            self.calls[key] += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            return self.calls[key]

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


def widget_stock(store: EventStore) -> int | None:
    item = load_aggregate(store.service("inventory"), inventory.StockItem, "widget")
    return None if item is None else item.on_hand


# == 1. compensation in any arrival order (guarantee 3) at concurrency 1 and 64 ===================

def inventory_variant(kind: str, seed: str) -> Service:
    """The example's inventory (`example`), or copies that wait while they hold the stock item."""
    if kind == "example":
        return inventory.service
    rng = random.Random(seed)

    def reserve(order: OrderPlaced, ctx: Context) -> Generator[float, None, Any]:
        inventory.stock_item(ctx, order.sku)  # claim the shared stock item ...
        yield rng.random() * 0.002  # ... hold it across a wait ...
        return inventory.reserve(order, ctx)  # ... then the example's step decides

    def release(done: Any, ctx: Context) -> Generator[float, None, Any]:
        yield rng.random() * 0.002
        return inventory.release(done, ctx)

    wrap, options, _ = MODES["threads8" if kind == "threads" else "async-c64"]
    service = Service("inventory", **options)
    service.step("reserve_inventory", on=OrderPlaced)(wrap(reserve))
    service.compensation("reserve_inventory")(wrap(release))
    return service


#: (inventory variant, concurrency given to the Processor)
VARIANTS = {
    "example-c1": ("example", 1), "example-c64": ("example", 64),
    "async-c1": ("async", 1), "async-c64": ("async", 64),
    "threads8": ("threads", None),
}


def arrival_log(rng: random.Random, copies: int = 2) -> tuple[list[Envelope], dict[str, list[str]]]:
    """Every arrival order of (trigger, failure, trigger, failure), `copies` sagas of each, interleaved.

    The duplicate trigger and failure have their own event ids (a resend, not a redelivery).
    Returns the log and the events inventory must emit for each saga.
    """
    chains, expected = [], {}
    for n, arrival in enumerate(ARRIVALS * copies):
        saga = f"s{n}-" + "".join(a[0] for a in arrival)
        placed = OrderPlaced(order_id=saga, customer_id="alice", sku="widget", quantity=n % 3 + 1, amount=900,
                             address="x")
        declined = PaymentDeclined(order_id=saga, customer_id="alice", amount=900, reason="insufficient funds")
        chains.append([
            envelope(placed, saga) if a == "trigger"
            else envelope(declined, saga, service="payment", step="process_payment", outcome="failed")
            for a in arrival
        ])
        first_trigger_wins = arrival.index("trigger") < arrival.index("failure")
        expected[saga] = ["ItemsReserved", "ItemsReleased"] if first_trigger_wins else ["choreo.StepSkipped"]
    return interleave(chains, rng), expected


@pytest.mark.parametrize("batch_size", [1, 3, 500])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compensation_is_correct_in_any_arrival_order_with_duplicates_while_sagas_interleave(
    variant: str, batch_size: int, any_store: EventStore
) -> None:
    kind, concurrency = VARIANTS[variant]
    seed = f"{variant}/{batch_size}"
    log, expected = arrival_log(random.Random(seed))
    any_store.append(log)
    run(inventory_variant(kind, seed), any_store, batch_size=batch_size, concurrency=concurrency)
    assert {saga: emitted(any_store, "inventory", saga) for saga in expected} == expected
    assert widget_stock(any_store) == inventory.CATALOG["widget"]  # every reservation was released
    assert any_store.service("inventory").dead_letters(None) == []


# == 2. exactly-once effect (guarantee 1) ========================================================

@pytest.mark.parametrize("variant", ["example-c1", "async-c64", "threads8"])
def test_the_same_batch_delivered_again_changes_nothing(variant: str, durable_store: EventStore) -> None:
    kind, concurrency = VARIANTS[variant]
    rng = random.Random(variant)
    log, expected = arrival_log(rng)
    plain = [envelope(OrderPlaced(order_id=f"p{i}", customer_id="bob", sku=rng.choice(["widget", "gadget"]),
                                  quantity=1, amount=100, address="x"), f"p{i}") for i in range(20)]
    durable_store.append(interleave([log, plain], rng))
    service = inventory_variant(kind, variant)
    run(service, durable_store, concurrency=concurrency)
    own = durable_store.service("inventory")

    def state() -> tuple[object, ...]:
        gadget = load_aggregate(own, inventory.StockItem, "gadget")
        return durable_store.read(0, 10_000), widget_stock(durable_store), gadget and gadget.on_hand, \
            own.dead_letters(None)

    before = state()
    assert emitted(durable_store, "inventory").count("ItemsReserved") == 20 + 6  # 20 plain orders, 6 reserved first
    again = Processor(service, durable_store, concurrency=concurrency)
    again.tracking = {}  # deliver the whole log again, as after a lost acknowledgement
    again.feed = durable_store.feed("inventory", dict)
    try:
        again.run_until_idle()
    finally:
        again.close()
    assert state() == before  # no event, aggregate change or dead letter more


class Crash(BaseException):
    """Stands for the process dying between the handlers and the commit."""


@pytest.mark.parametrize("mode", ["async-c64", "threads8"])
def test_a_crash_before_a_concurrent_batch_commits_writes_nothing_and_the_rerun_takes_effect_once(
    mode: str, durable_store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrap, options, popts = MODES[mode]
    probe = Probe()

    def reserve(order: OrderPlaced, ctx: Context) -> Generator[float, None, Any]:
        probe.enter(order.order_id)
        try:
            inventory.stock_item(ctx, order.sku)
            yield 0.001
            return inventory.reserve(order, ctx)
        finally:
            probe.leave()

    service = Service("inventory", **options)
    service.step("reserve_inventory", on=OrderPlaced)(wrap(reserve))
    orders = [f"o{i}" for i in range(40)]
    durable_store.append([envelope(OrderPlaced(order_id=o, customer_id="c", sku="widget", quantity=2, amount=1,
                                              address="x"), o) for o in orders])
    log_before = durable_store.read(0, 10_000)
    crashing = Processor(service, durable_store, **popts)
    real_commit = crashing.own.commit

    def crash(**kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(crashing.own, "commit", crash)
    with pytest.raises(Crash):
        crashing.poll()
    crashing.close()
    assert durable_store.read(0, 10_000) == log_before and widget_stock(durable_store) is None  # nothing written
    monkeypatch.setattr(crashing.own, "commit", real_commit)
    run(service, durable_store, **popts)  # the restarted service
    assert probe.peak > 1
    assert all(probe.calls[o] >= 2 for o in orders)  # every handler ran again ...
    assert emitted(durable_store, "inventory") == ["ItemsReserved"] * 40  # ... and took effect once
    assert widget_stock(durable_store) == inventory.CATALOG["widget"] - 2 * 40


# == 3. each saga in log order while sagas interleave (guarantees 4, 10) ==========================

class ConcTick(Event):
    seq: int


class ConcTrail(Aggregate):
    """The ticks of one saga, in the order they were handled."""

    @event("Opened")
    def __init__(self) -> None:
        self.seqs: list[int] = []

    @event("Ticked")
    def tick(self, seq: int) -> None:
        self.seqs.append(seq)


class ConcLedger(Aggregate):
    """Shared by every saga: what each saga entered, once."""

    @event("Opened")
    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []

    @event("Entered")
    def enter(self, saga: str, seq: int) -> None:
        if [saga, seq] in [list(e) for e in self.entries]:
            raise ValueError(f"{saga}/{seq} entered twice")
        self.entries.append((saga, seq))


@pytest.mark.parametrize("mode", MODES)
def test_each_sagas_events_are_handled_in_log_order_while_sagas_interleave(mode: str, any_store: EventStore) -> None:
    wrap, options, popts = MODES[mode]
    rng = random.Random(mode)
    probe = Probe()

    def tick(t: ConcTick, ctx: Context) -> Generator[float, None, None]:
        probe.enter()
        try:
            yield rng.random() * 0.003
            trail = ctx.find(ConcTrail, ctx.saga_id) or ctx.create(ConcTrail, ctx.saga_id)
            yield rng.random() * 0.003
            if t.seq % 2 == 0:  # the even ticks also touch an aggregate every saga shares
                board = ctx.find(ConcLedger, "board") or ctx.create(ConcLedger, "board")
                board.enter(ctx.saga_id, t.seq)
            trail.tick(t.seq)
            with probe.lock:  # after the last aggregate access: only a run that merges gets here
                probe.seen.append((ctx.saga_id, t.seq))
        finally:
            probe.leave()

    service = Service("tracer", **options)
    service.on(ConcTick)(wrap(tick))
    sagas, ticks = [f"t{s:02d}" for s in range(24)], 6
    any_store.append(interleave([[envelope(ConcTick(seq=i), s) for i in range(ticks)] for s in sagas], rng))
    run(service, any_store, **popts)  # one batch of 144 events

    assert len(probe.seen) == len(sagas) * ticks  # each event merged once
    own = any_store.service("tracer")
    for s in sagas:
        assert [seq for saga, seq in probe.seen if saga == s] == list(range(ticks)), s  # log order, always
        trail = load_aggregate(own, ConcTrail, s)
        assert trail is not None and trail.seqs == list(range(ticks)), s
    board = load_aggregate(own, ConcLedger, "board")
    assert board is not None
    pinned = [tuple(e) for e in board.entries]
    assert sorted(pinned) == sorted((s, i) for s in sagas for i in range(0, ticks, 2))
    for s in sagas:
        assert [i for saga, i in pinned if saga == s] == [0, 2, 4]  # in log order in the shared aggregate too
    assert board.version == 1 + len(pinned)
    if mode == "serial":
        assert probe.peak == 1
    else:  # sagas really interleaved: handlers of several sagas were waiting at once
        assert probe.peak > 1


# == 4. a Busy re-run gives a serial result (guarantee 10) ======================================

class ConcWithdraw(Event):
    amount: int


class ConcWithdrawn(Event):
    amount: int
    balance: int


class ConcRefused(Event):
    amount: int
    balance: int


class ConcAccount(Aggregate):
    @event("Opened")
    def __init__(self, balance: int) -> None:
        self.balance = balance

    @event("Debited")
    def debit(self, amount: int) -> None:
        if amount > self.balance:
            raise ValueError("overdrawn")
        self.balance -= amount


def bank(mode: str, probe: Probe, opening: int, together: threading.Barrier | None = None) -> Service:
    """`together`: the first runs of that many handlers (threads) meet before they load the account,
    so that they do run at once, however late the pool starts one of them on a loaded machine."""
    wrap, options, _ = MODES[mode]

    def withdraw(w: ConcWithdraw, ctx: Context) -> Generator[float, None, ConcWithdrawn]:
        run = probe.enter()
        if together is not None and run <= together.parties:
            together.wait(timeout=10)
        try:
            account = ctx.find(ConcAccount, "shared") or ctx.create(ConcAccount, "shared", balance=opening)
            balance = account.balance  # read ...
            yield 0.01  # ... wait (a remote check) ...
            if w.amount > balance:  # ... decide on what was read
                raise StepFailed(ConcRefused(amount=w.amount, balance=balance))
            account.debit(w.amount)
            return ConcWithdrawn(amount=w.amount, balance=account.balance)
        finally:
            probe.leave()

    service = Service("bank", **options)
    service.step("withdraw", on=ConcWithdraw)(wrap(withdraw))
    return service


@pytest.mark.parametrize("mode", ["async-c64", "threads8"])
def test_two_sagas_on_one_aggregate_give_a_serial_result(mode: str, any_store: EventStore) -> None:
    probe = Probe()
    any_store.append([envelope(ConcWithdraw(amount=70), "A"), envelope(ConcWithdraw(amount=50), "B")])
    together = threading.Barrier(2) if mode.startswith("threads") else None  # async: both start in one loop
    run(bank(mode, probe, opening=100, together=together), any_store, **MODES[mode][2])
    outcome = {e.saga_id: e.type for e in any_store.read(0, 100) if e.service == "bank"}
    account = load_aggregate(any_store.service("bank"), ConcAccount, "shared")
    assert account is not None
    serial = [  # A then B, or B then A
        ({"A": "ConcWithdrawn", "B": "ConcRefused"}, 30),
        ({"A": "ConcRefused", "B": "ConcWithdrawn"}, 50),
    ]
    assert (outcome, account.balance) in serial
    assert probe.calls[None] == 3  # the second found the account claimed, and ran again after the first
    assert any_store.service("bank").dead_letters(None) == []


@pytest.mark.parametrize("mode", ["async-c64", "threads8"])
def test_many_sagas_on_one_aggregate_equal_the_serial_run_in_the_order_they_merged(
    mode: str, any_store: EventStore
) -> None:
    rng = random.Random(mode)
    amounts = {f"w{i:02d}": rng.randint(5, 40) for i in range(16)}
    any_store.append([envelope(ConcWithdraw(amount=a), s) for s, a in amounts.items()])
    probe = Probe()
    run(bank(mode, probe, opening=200), any_store, **MODES[mode][2])
    balance = 200  # replay the outcomes in log order (the order the handlers merged) one at a time
    outcomes = [e for e in any_store.read(0, 1000) if e.service == "bank"]
    assert sorted(e.saga_id for e in outcomes) == sorted(amounts)
    for e in outcomes:
        amount, seen = e.decode().amount, e.decode().balance  # type: ignore[attr-defined]
        if amount <= balance:
            assert (e.type, seen) == ("ConcWithdrawn", balance - amount), e.saga_id
            balance -= amount
        else:
            assert (e.type, seen) == ("ConcRefused", balance), e.saga_id
    account = load_aggregate(any_store.service("bank"), ConcAccount, "shared")
    assert account is not None and account.balance == balance
    assert probe.calls[None] > len(amounts)  # some ran again after another saga's handler


# == 5. a failing handler takes nothing of the other sagas with it (guarantees 1, 6) =============

class ConcAdd(Event):
    seq: int


class ConcAdded(Event):
    seq: int


@pytest.mark.parametrize("mode", MODES)
def test_a_handler_failure_in_one_saga_loses_and_duplicates_nothing_of_the_others(
    mode: str, any_store: EventStore
) -> None:
    wrap, options, popts = MODES[mode]
    rng = random.Random(mode)
    broken = {"on": True}

    def add(a: ConcAdd, ctx: Context) -> Generator[float, None, ConcAdded]:
        yield rng.random() * 0.002
        ledger = ctx.find(ConcLedger, "all") or ctx.create(ConcLedger, "all")
        yield rng.random() * 0.001
        if ctx.saga_id == "bad" and broken["on"]:
            raise ValueError("a bug in the handler")  # not transient: parked at once
        ledger.enter(ctx.saga_id, a.seq)
        return ConcAdded(seq=a.seq)

    service = Service("ledger", retry=RetryPolicy(retry_on=(TimeoutError,)), **options)
    service.on(ConcAdd)(wrap(add))
    sagas = ["bad"] + [f"g{i:02d}" for i in range(39)]
    log = interleave([[envelope(ConcAdd(seq=i), s) for i in range(2)] for s in sagas], rng)
    any_store.append(log)
    run(service, any_store, **popts)

    own = any_store.service("ledger")
    good = {(s, i) for s in sagas[1:] for i in range(2)}
    ledger = load_aggregate(own, ConcLedger, "all")
    assert ledger is not None and sorted(tuple(e) for e in ledger.entries) == sorted(good)  # none lost, none twice
    assert ledger.version == 1 + len(good)
    added = Counter((e.saga_id, e.decode().seq) for e in any_store.read(0, 1000) if e.type == "ConcAdded")  # type: ignore[attr-defined]
    assert added == Counter(good)
    letters = own.dead_letters(None)
    assert [(d.saga_id, d.status) for d in letters] == [("bad", "parked"), ("bad", "parked")]
    assert "ValueError: a bug in the handler" in letters[0].reason and letters[1].reason.startswith("held behind")
    assert own.tracking() == {"log": len(log)}

    broken["on"] = False  # the bug is fixed; the operator retries the first letter
    request_retry(any_store, letters[0])
    run(service, any_store, **popts)
    ledger = load_aggregate(own, ConcLedger, "all")
    assert ledger is not None and [tuple(e) for e in ledger.entries][-2:] == [("bad", 0), ("bad", 1)]  # in order
    assert all(d.status not in HOLDING for d in own.dead_letters(None))


@pytest.mark.parametrize("mode", MODES)
def test_a_handler_that_fails_after_changing_a_shared_aggregate_leaves_it_as_it_was(
    mode: str, any_store: EventStore
) -> None:
    """The view works on the batch's own object of the aggregate: a failure must put it back."""
    wrap, options, popts = MODES[mode]
    rng = random.Random(mode)

    def add(a: ConcAdd, ctx: Context) -> Generator[float, None, ConcAdded]:
        ledger = ctx.find(ConcLedger, "all") or ctx.create(ConcLedger, "all")
        ledger.enter(ctx.saga_id, a.seq)  # changed first ...
        yield rng.random() * 0.002
        if ctx.saga_id.startswith("bad"):
            raise ValueError("a bug after the change")  # ... then failed: the change must not stay
        return ConcAdded(seq=a.seq)

    service = Service("ledger", retry=RetryPolicy(retry_on=(TimeoutError,)), **options)
    service.on(ConcAdd)(wrap(add))
    sagas = [f"bad{i}" for i in range(3)] + [f"g{i:02d}" for i in range(20)]
    any_store.append([envelope(ConcAdd(seq=0), s) for s in rng.sample(sagas, len(sagas))])
    run(service, any_store, **popts)
    ledger = load_aggregate(any_store.service("ledger"), ConcLedger, "all")
    assert ledger is not None
    assert sorted(e[0] for e in ledger.entries) == sorted(sagas[3:])
    assert ledger.version == 1 + 20
    assert sorted(d.saga_id for d in any_store.service("ledger").dead_letters(None)) == sagas[:3]


class ConcPair(Event):
    first: str


class ConcCounter(Aggregate):
    @event("Opened")
    def __init__(self) -> None:
        self.count = 0

    @event("Counted")
    def count_one(self) -> None:
        self.count += 1


@pytest.mark.parametrize("mode", ["async-c64", "threads8"])
def test_a_handler_that_meets_a_claimed_aggregate_after_changing_another_counts_once(
    mode: str, any_store: EventStore
) -> None:
    """Half the sagas count X then Y, half Y then X: a view that changed one and found the other
    claimed runs again, and the change of its abandoned run must not stay in the batch."""
    wrap, options, popts = MODES[mode]
    probe = Probe()

    def count(p: ConcPair, ctx: Context) -> Generator[float, None, None]:
        probe.enter()
        try:
            for name in (p.first, "Y" if p.first == "X" else "X"):
                counter = ctx.find(ConcCounter, name) or ctx.create(ConcCounter, name)
                counter.count_one()
                yield 0.002
        finally:
            probe.leave()

    service = Service("counter", **options)
    service.on(ConcPair)(wrap(count))
    n = 24
    any_store.append([envelope(ConcPair(first="XY"[i % 2]), f"s{i:02d}") for i in range(n)])
    run(service, any_store, **popts)
    own = any_store.service("counter")
    counts = {name: load_aggregate(own, ConcCounter, name) for name in "XY"}
    assert {k: (c.count, c.version) for k, c in counts.items() if c} == {"X": (n, n + 1), "Y": (n, n + 1)}
    assert probe.calls[None] > n  # some ran again after meeting a claimed counter
    assert own.dead_letters(None) == []


# == 6. non-blocking durable retries (guarantees 6, 7) ===========================================

class FixedDelay(RetryPolicy):
    """Every retry 30 s after the failure (no jitter), so the test knows when it is due."""

    def delay(self, attempt: int) -> float:
        return 30.0


class ConcLeg(Event):
    seq: int


def courier(mode: str, probe: Probe) -> Service:
    """Records each saga's legs; the first attempt at saga `slow`'s first leg times out."""
    wrap, options, _ = MODES[mode]

    def leg(event_: ConcLeg, ctx: Context) -> Generator[float, None, None]:
        attempt = probe.enter((ctx.saga_id, event_.seq))
        try:
            yield random.random() * 0.002
            trail = ctx.find(ConcTrail, ctx.saga_id) or ctx.create(ConcTrail, ctx.saga_id)
            if ctx.saga_id == "slow" and event_.seq == 0 and attempt == 1:
                raise TimeoutError("the carrier's API timed out")
            trail.tick(event_.seq)
        finally:
            probe.leave()

    service = Service("courier", retry=FixedDelay(max_attempts=3, retry_on=(TimeoutError,)), **options)
    service.on(ConcLeg)(wrap(leg))
    return service


def legs(store: EventStore, saga: str) -> list[int] | None:
    trail = load_aggregate(store.service("courier"), ConcTrail, saga)
    return None if trail is None else trail.seqs


def retry_log(rng: random.Random) -> list[Envelope]:
    return interleave([[envelope(ConcLeg(seq=i), s) for i in range(3)] for s in ("slow", "a", "b", "c")], rng)


@pytest.mark.parametrize("mode", MODES)
def test_a_transient_failure_waits_for_its_next_attempt_while_other_sagas_complete(mode: str, db_path: Path) -> None:
    probe = Probe()
    service = courier(mode, probe)
    with freeze_time("2026-03-01 12:00:00", real_asyncio=True) as frozen:
        store = open_store(f"sqlite:///{db_path}")
        store.append(retry_log(random.Random(mode)))
        processor = Processor(service, store, **MODES[mode][2])
        try:
            processor.run_until_idle()
            assert [legs(store, s) for s in ("a", "b", "c")] == [[0, 1, 2]] * 3  # the others did not wait
            assert legs(store, "slow") is None
            letters = store.service("courier").dead_letters(None)
            assert [(d.saga_id, d.status) for d in letters] == [("slow", RETRYING), ("slow", "parked"),
                                                                 ("slow", "parked")]
            due = datetime(2026, 3, 1, 12, 0, 30, tzinfo=timezone.utc)
            assert letters[0].due_at == due and processor.next_retry_at == due
            assert all(d.reason.startswith("held behind") for d in letters[1:])

            # while it waits, its new events wait behind it, and other sagas' events flow
            store.append([envelope(ConcLeg(seq=3), "slow"), envelope(ConcLeg(seq=3), "a"),
                          envelope(ConcLeg(seq=0), "d")])
            processor.run_until_idle()
            for _ in range(3):
                processor.poll()
            frozen.tick(timedelta(seconds=29))
            processor.run_until_idle()
            assert legs(store, "a") == [0, 1, 2, 3] and legs(store, "d") == [0]
            assert legs(store, "slow") is None and probe.calls["slow", 0] == 1  # not tried before it is due

            frozen.tick(timedelta(seconds=2))  # now it is due
            processor.run_until_idle()
            assert legs(store, "slow") == [0, 1, 2, 3]  # it completed, then what waited behind it, in order
            assert probe.calls["slow", 0] == 2 and all(probe.calls["slow", i] == 1 for i in (1, 2, 3))
            assert all(d.status not in HOLDING for d in store.service("courier").dead_letters(None))
            notes = [e for e in store.read(0, 1000) if e.type == "choreo.HandlerRetried"]
            assert [n.saga_id for n in notes] == ["slow"]
            assert processor.next_retry_at is None
        finally:
            processor.close()
            store.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_retry_that_came_due_while_the_service_was_down_runs_after_restart(mode: str, db_path: Path) -> None:
    probe = Probe()
    service = courier(mode, probe)
    url = f"sqlite:///{db_path}"

    def restart() -> None:
        store = open_store(url)
        try:
            run(service, store, **MODES[mode][2])
        finally:
            store.close()

    with freeze_time("2026-03-01 12:00:00", real_asyncio=True) as frozen:
        store = open_store(url)
        store.append(retry_log(random.Random(mode)))
        store.close()
        restart()  # the first attempt at slow/0 fails; the service then stops
        frozen.tick(timedelta(seconds=10))
        restart()  # restarted before the retry is due: it still waits
        assert probe.calls["slow", 0] == 1
        frozen.tick(timedelta(minutes=5))  # the retry came due while the service was down
        restart()
        store = open_store(url)
        try:
            assert [legs(store, s) for s in ("slow", "a", "b", "c")] == [[0, 1, 2]] * 4
            assert probe.calls["slow", 0] == 2
            assert all(d.status not in HOLDING for d in store.service("courier").dead_letters(None))
        finally:
            store.close()


def test_threads_given_to_the_processor_handle_that_many_sagas_at_once() -> None:
    """`choreo run --threads N` passes threads=N to the Processor: a plain service then handles N sagas at once."""
    service = Service("plain")
    service.on(ConcTick)(lambda t, ctx: None)
    processor = Processor(service, InMemoryStore(), threads=8)
    try:
        assert processor.concurrency == 8
    finally:
        processor.close()


# == 7. kill -9 of a concurrent service process (guarantees 1, 8, 9) =============================

def spawn(target: str, url: str) -> subprocess.Popen[bytes]:
    """`choreo run` of a service of `tests.async_system`, from the repository's root, in batches of 50."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "choreo", "run", target, "--store", url, "--batch-size", "50", "--log-level", "WARNING"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL,
    )


def count(path: Path, types: frozenset[str] | set[str]) -> int:
    """How many sagas have an event of one of `types` in the log."""
    conn = sqlite3.connect(path)
    try:
        marks = ",".join("?" * len(types))
        return int(conn.execute(f"SELECT COUNT(DISTINCT saga_id) FROM choreo_log WHERE type IN ({marks})",
                                sorted(types)).fetchone()[0])
    finally:
        conn.close()


def count_ends(path: Path) -> int:
    return count(path, async_system.END_TYPES)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_of_a_concurrent_service_process_mid_run_then_restart_ends_every_saga_once(tmp_path: Path) -> None:
    path = tmp_path / "kill.db"
    url = f"sqlite:///{path}"
    store = open_store(url)
    system = async_system.system
    keys = [f"k{i:03d}" for i in range(600)]
    buckets = {k: f"b{i % 5}" for i, k in enumerate(keys)}
    waves = [keys[:200], keys[200:400], keys[400:]]

    def start(wave: list[str]) -> None:
        system.start_many(store, [(async_system.KOrdered(key=k, bucket=buckets[k]), k) for k in wave])

    procs = {name: spawn(target, url) for name, target in async_system.TARGETS.items()}
    kills: list[tuple[int, int]] = []  # (sagas ended, sagas started) when the worker was killed
    try:
        for n, wave in enumerate(waves):
            start(wave)  # the first wave, then each while the worker is down: it needs the worker
            if n:
                time.sleep(0.2)
                procs["kworker"] = spawn(async_system.TARGETS["kworker"], url)
            if n < len(waves) - 1:  # kill -9 the concurrent worker mid-run (twice): once it has begun the wave
                prepared = count(path, {"KPrepared"})
                wait_until(lambda: count(path, {"KPrepared"}) >= prepared + 10, 60, "the worker to begin a wave")
                kills.append((count_ends(path), 200 * (n + 1)))
                os.kill(procs["kworker"].pid, signal.SIGKILL)
                procs["kworker"].wait()
        wait_until(lambda: count_ends(path) == len(keys), 120, "every saga to end")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs.values()]
    assert codes == [0] * len(codes)  # SIGTERM stops a service cleanly
    assert all(ended < started for ended, started in kills), f"a kill found nothing running: {kills}"

    events: dict[str, Counter[str]] = defaultdict(Counter)
    seen: set[str] = set()
    for batch in store.scan():
        for e in batch:
            assert e.event_id not in seen
            seen.add(e.event_id)
            events[e.saga_id][e.type] += 1
    for k in keys:  # every saga ended once, each step's effect once
        got = events[k]
        if async_system.fails(k):
            assert (got["KCancelled"], got["KDone"], got["choreo.SagaFailed"], got["choreo.SagaCompleted"]) == \
                (1, 0, 1, 0), (k, got)
            assert (got["KPrepared"], got["KPacked"], got["KRejected"], got["KUnprepared"], got["KUnpacked"]) == \
                (1, 1, 1, 1, 1), (k, got)
        else:
            assert (got["KDone"], got["KCancelled"], got["choreo.SagaCompleted"], got["choreo.SagaFailed"]) == \
                (1, 0, 1, 0), (k, got)
            assert (got["KPrepared"], got["KPacked"], got["KShipped"], got["KUnprepared"]) == (1, 1, 1, 0), (k, got)
    worker = store.service("kworker")
    for b in sorted(set(buckets.values())):
        bucket = load_aggregate(worker, async_system.Bucket, b)
        mine = [k for k in keys if buckets[k] == b]
        assert bucket is not None
        assert sorted(bucket.members) == sorted(k for k in mine if not async_system.fails(k))
        assert bucket.version == 1 + len(mine) + sum(async_system.fails(k) for k in mine)  # no effect twice
    for k in keys:
        parcel = load_aggregate(worker, async_system.Parcel, k)
        assert parcel is not None and parcel.cancelled == async_system.fails(k)
        assert parcel.version == (2 if async_system.fails(k) else 1)
    assert worker.dead_letters(None) == [] and store.service("kdesk").dead_letters(None) == []
    store.close()


# == 8. regressions: two bugs found while writing these tests (fixed in 3aceb2c and 111c8d0) ============

class ConcBuy(Event):
    buyer: str


class ConcPool(Aggregate):
    @event("Opened")
    def __init__(self) -> None:
        self.buyers: list[str] = []

    @event("Joined")
    def join(self, buyer: str) -> None:
        self.buyers.append(buyer)


def test_a_woken_waiter_that_fails_before_taking_the_aggregate_again_does_not_strand_the_others() -> None:
    """A, B and C want one aggregate; B, woken when A releases it, fails before it takes it again: C still runs.

    (Before 3aceb2c only the first waiter was woken, and C waited for ever: the batch never ended.)
    """
    prices: Counter[str] = Counter()

    async def buy(b: ConcBuy, ctx: Context) -> None:
        prices[b.buyer] += 1  # a remote price check first; B's second call times out
        await asyncio.sleep(0.001)
        if b.buyer == "B" and prices["B"] == 2:
            raise TimeoutError("the price service timed out")
        pool = ctx.find(ConcPool, "pool") or ctx.create(ConcPool, "pool")
        await asyncio.sleep(0.02)  # A holds the pool while B, then C, find it claimed and wait in line
        pool.join(b.buyer)

    service = Service("buyers", concurrency=64, retry=FixedDelay())  # B's next attempt is not due in this poll
    service.on(ConcBuy)(buy)
    store = InMemoryStore()
    store.append([envelope(ConcBuy(buyer=b), b) for b in "ABC"])
    processor = Processor(service, store)

    async def poll() -> int:
        return await asyncio.wait_for(processor.apoll(), 3)  # the batch takes ~25 ms

    try:
        asyncio.run(poll())
    except TimeoutError:
        pytest.fail(f"the batch never ended: C waits for a pool nobody holds (calls: {dict(prices)})")
    finally:
        processor.close()
    pool = load_aggregate(store.service("buyers"), ConcPool, "pool")
    assert pool is not None and sorted(pool.buyers) == ["A", "C"]
    assert [(d.saga_id, d.status) for d in store.service("buyers").dead_letters(None)] == [("B", RETRYING)]


@pytest.mark.parametrize("concurrency", [1, 64])
def test_a_failure_in_the_same_batch_as_a_parked_trigger_skips_it_at_any_concurrency(
    concurrency: int, any_store: EventStore
) -> None:
    """The saga's failure resolves its parked trigger as skipped, also when both are in one concurrent batch.

    (Before 111c8d0 the letter, kept in the batch until its commit, was not found: it stayed parked.)
    """
    service = Service("inventory", retry=RetryPolicy(retry_on=(TimeoutError,)))

    @service.step("reserve_inventory", on=OrderPlaced)
    async def reserve(order: OrderPlaced, ctx: Context) -> None:
        raise ValueError("a bug in the handler")  # not transient: parked

    placed = OrderPlaced(order_id="o", customer_id="c", sku="widget", quantity=1, amount=1, address="x")
    declined = PaymentDeclined(order_id="o", customer_id="c", amount=1, reason="insufficient funds")
    any_store.append([envelope(placed, "S"),
                      envelope(declined, "S", service="payment", step="process_payment", outcome="failed")])
    processor = run(service, any_store, concurrency=concurrency)
    letters = any_store.service("inventory").dead_letters(None)
    assert [(d.type, d.status) for d in letters] == [("OrderPlaced", "skipped")]
    assert emitted(any_store, "inventory") == ["choreo.StepSkipped"]
    assert "choreo.DeadLetterResolved" in [e.type for e in any_store.read(0, 100)]
    assert "S" not in processor.held
