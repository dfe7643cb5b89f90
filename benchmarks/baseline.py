"""The baseline: the same 4-step order choreography written directly on `eventsourcing`'s System.

One process application per service (orders, inventory, payment, shipping, notification),
each with its own SQLite file (`PERSISTENCE_MODULE=eventsourcing.sqlite`), run by
`SingleThreadedRunner` or `NewSingleThreadedRunner` (`RUNNERS`). Happy path: OrderPlaced ->
reserve -> charge -> ship -> notify -> confirm. Both runners process a saga to its end inside
`Orders.place()`, in the calling thread.

    python -m benchmarks.baseline --sagas 1000 [--runner new_single_threaded] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import NewSingleThreadedRunner, ProcessApplication, Runner, SingleThreadedRunner, System

#: eventsourcing's in-process runners, by the name the results give them
RUNNERS: dict[str, type[Runner]] = {
    "single_threaded": SingleThreadedRunner,
    "new_single_threaded": NewSingleThreadedRunner,
}


def key(kind: str, order_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"{kind}/{order_id}")


class Order(Aggregate):
    @event("Placed")
    def __init__(self, order_id: str, sku: str, quantity: int, amount: int) -> None:
        self.order_id, self.sku, self.quantity, self.amount, self.status = order_id, sku, quantity, amount, "placed"

    @staticmethod
    def create_id(order_id: str, **_: Any) -> UUID:
        return key("order", order_id)

    @event("Confirmed")
    def confirm(self) -> None:
        self.status = "confirmed"


class Reservation(Aggregate):
    @event("Created")
    def __init__(self, order_id: str, amount: int) -> None:
        self.order_id, self.amount = order_id, amount

    @staticmethod
    def create_id(order_id: str, **_: Any) -> UUID:
        return key("reservation", order_id)


class Charge(Aggregate):
    @event("Created")
    def __init__(self, order_id: str, amount: int) -> None:
        self.order_id, self.amount = order_id, amount

    @staticmethod
    def create_id(order_id: str, **_: Any) -> UUID:
        return key("charge", order_id)


class Shipment(Aggregate):
    @event("Created")
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id

    @staticmethod
    def create_id(order_id: str, **_: Any) -> UUID:
        return key("shipment", order_id)


class Notice(Aggregate):
    @event("Created")
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id

    @staticmethod
    def create_id(order_id: str, **_: Any) -> UUID:
        return key("notice", order_id)


class Orders(ProcessApplication[UUID]):
    def place(self, order_id: str) -> None:
        self.save(Order(order_id=order_id, sku="widget", quantity=1, amount=100))

    def is_confirmed(self, order_id: str) -> bool:
        return self.repository.get(key("order", order_id)).status == "confirmed"

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Confirm the order when the customer is notified."""

    @policy.register(Notice.Created)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        order = self.repository.get(key("order", domain_event.order_id))
        order.confirm()
        processing_event.collect_events(order)


def _step(source: type, target: type) -> type:
    """A process application that creates a `target` aggregate when `source` is created."""

    class Step(ProcessApplication[UUID]):
        @singledispatchmethod
        def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
            """Ignore what is not this step's trigger."""

        @policy.register(getattr(source, "Placed", None) or source.Created)
        def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
            kwargs = {"amount": domain_event.amount} if "amount" in target.__init__.__code__.co_varnames else {}
            processing_event.collect_events(target(order_id=domain_event.order_id, **kwargs))

    return Step


Inventory = type("Inventory", (_step(Order, Reservation),), {})
Payment = type("Payment", (_step(Reservation, Charge),), {})
Shipping = type("Shipping", (_step(Charge, Shipment),), {})
Notification = type("Notification", (_step(Shipment, Notice),), {})


def _started(folder: str, runner: str) -> Runner:
    apps = (Orders, Inventory, Payment, Shipping, Notification)
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite"}
    for app in apps:
        env[f"{app.__name__.upper()}_SQLITE_DBNAME"] = os.path.join(folder, f"{app.__name__.lower()}.db")
    system = System(pipes=[[Orders, Inventory, Payment, Shipping, Notification, Orders]])
    started = RUNNERS[runner](system, env=env)
    started.start()
    return started


def measure(sagas: int, folder: str, runner: str = "single_threaded") -> dict[str, Any]:
    """Run `sagas` happy-path sagas on eventsourcing's System with `runner` (see `RUNNERS`); return sagas/s."""
    running = _started(folder, runner)
    try:
        orders = running.get(Orders)
        orders.place("warm-up")
        started = time.perf_counter()
        for i in range(sagas):
            orders.place(f"o-{i}")
        elapsed = time.perf_counter() - started
        assert all(orders.is_confirmed(f"o-{i}") for i in range(0, sagas, max(1, sagas // 50)))
    finally:
        running.stop()
    return {"runner": runner, "sagas": sagas, "elapsed_s": round(elapsed, 3), "sagas_per_s": round(sagas / elapsed, 1)}


def latencies(sequential: int, folder: str, runner: str = "single_threaded") -> list[float]:
    """Seconds from placing an order to its confirmation, one saga at a time, on `runner`."""
    running = _started(folder, runner)
    try:
        orders = running.get(Orders)
        orders.place("warm-up")
        out = []
        for i in range(sequential):
            t0 = time.perf_counter()
            orders.place(f"seq-{i}")
            out.append(time.perf_counter() - t0)
            assert orders.is_confirmed(f"seq-{i}")  # the runner ran the saga to its end inside place()
    finally:
        running.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--runner", choices=sorted(RUNNERS), default="single_threaded")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args.sagas, folder, args.runner)
    print(json.dumps(result) if args.json else "  ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
