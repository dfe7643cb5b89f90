"""A service with one hot aggregate, for the snapshot tests and benchmark.

`python -c "import tests.snapshot_ledger as m; m.main()" URL EVERY BATCH` runs the ledger
over the log until it is stopped (the kill -9 test stops it that way).
"""

from __future__ import annotations

import sys
from typing import ClassVar

from choreo import Aggregate, Context, Event, Processor, Service, event, open_store

KEY = "hot"


class Bump(Event):
    """One more unit for the hot tally."""

    event_type: ClassVar[str] = "snap.Bump"
    n: int


class Tally(Aggregate):
    """The hot aggregate: an event per `Bump`."""

    @event("Started")
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.total = 0
        self.seen: dict[str, int] = {}

    @event("Bumped")
    def bump(self, n: int) -> None:
        self.count += 1
        self.total += n
        self.seen[str(n % 50)] = self.seen.get(str(n % 50), 0) + 1


#: what the handler saw of the tally before each bump: (count, total)
seen: list[tuple[int, int]] = []


def ledger(every: int | None) -> Service:
    """The ledger service, snapshotting the tally every `every` events (None: never)."""
    service = Service("ledger", snapshot_every={Tally: every} if every else None)

    @service.on(Bump)
    def on_bump(bump: Bump, ctx: Context) -> None:
        tally = ctx.find(Tally, KEY) or ctx.create(Tally, KEY, name=KEY)
        seen.append((tally.count, tally.total))
        tally.bump(bump.n)

    return service


def main() -> None:
    """Run the ledger over the log at `sys.argv[1]` until killed."""
    proc = Processor(ledger(int(sys.argv[2])), open_store(sys.argv[1]), batch_size=int(sys.argv[3]))
    print("ready", flush=True)
    while True:
        proc.poll(0.1)
