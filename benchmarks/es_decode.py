"""`eventsourcing` reading its own notification log: the decode-speed baseline of the replay benchmark.

It fills an `eventsourcing` application's SQLite file with about N events (aggregates of
seven events each, like a saga), then, in a fresh process, selects every notification
and maps it back to a domain event with the application's mapper.
"""

from __future__ import annotations

import os
import time
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

EVENTS_PER_AGGREGATE = 7


class Saga(Aggregate):
    @event("Started")
    def __init__(self, order_id: str, customer_id: str, amount: int) -> None:
        self.order_id, self.customer_id, self.amount, self.steps = order_id, customer_id, amount, []

    @event("Stepped")
    def step(self, name: str, outcome: str) -> None:
        self.steps.append((name, outcome))


class Sagas(Application[Any]):
    """The application whose notification log is read back."""


def _app(path: str) -> Sagas:
    return Sagas(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path})


def build(path: str, events: int) -> int:
    """Write about `events` events (in batches of 500 aggregates); return how many."""
    app = _app(path)
    written = 0
    while written < events:
        batch = []
        for i in range(500):
            saga = Saga(order_id=f"o-{written}-{i}", customer_id="c-1", amount=100)
            for n in range(EVENTS_PER_AGGREGATE - 1):
                saga.step(f"step-{n}", "completed")
            batch.append(saga)
        app.save(*batch)
        written += 500 * EVENTS_PER_AGGREGATE
    app.close()
    return written


def decode(path: str) -> int:
    """Select every notification and decode it into a domain event; return the count."""
    app = _app(path)
    count, start = 0, 1
    while notifications := app.recorder.select_notifications(start=start, limit=5000):
        for n in notifications:
            app.mapper.to_domain_event(n)
        count += len(notifications)
        start = notifications[-1].id + 1
    app.close()
    return count


def measure(path: str) -> dict[str, float]:
    started = time.perf_counter()
    count = decode(path)
    return {"events": count, "seconds": round(time.perf_counter() - started, 2),
            "events_per_s": round(count / (time.perf_counter() - started))}


if __name__ == "__main__":
    import sys

    target = os.path.join(sys.argv[1], "es.db")
    t = time.perf_counter()
    n = build(target, int(sys.argv[2]))
    print("built", n, time.perf_counter() - t)
    print(measure(target))
