"""Snapshot benchmark: restart-to-first-handled-event with and without aggregate snapshots.

    python -m benchmarks.snapshots [--events 100000] [--every 1000] [--json]

The example's inventory keeps one `StockItem` per SKU, and each order adds an event to
it. This writes N events of one `StockItem` into the inventory's own store (committed as
the inventory commits them, a snapshot every `--every` events), puts one new order in the
log, and then, in a fresh process each, restarts the inventory and times how long it
takes from opening the store to having handled that order (the commit included): once
loading the item from its latest snapshot, once replaying all its events (three restarts
each, on fresh copies; the median is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

SKU = "widget"
ROUNDS = 3
BATCH = 5000


def build(path: str, events: int, every: int) -> None:
    """The inventory's store with `events` events of the widget's `StockItem`, and one order in the log."""
    from choreo import open_store
    from choreo._unit_of_work import AggregateCache, UnitOfWork
    from choreo.aggregates import aggregate_id, create_with_id, new_mapper
    from choreo.snapshots import Snapshotting
    from services import system
    from services.contracts import OrderPlaced
    from services.inventory import CATALOG, StockItem

    store = open_store(f"sqlite:///{path}?durability=normal")
    own = store.service("inventory")
    mapper, snapshotting = new_mapper(), Snapshotting({StockItem: every})
    item = create_with_id(StockItem, aggregate_id(StockItem, SKU), sku=SKU, on_hand=CATALOG[SKU])
    done = 1
    while done < events:
        uow = UnitOfWork("inventory", own, mapper, AggregateCache(1), snapshotting)
        uow.add(item)
        for _ in range(min(BATCH, events - done)):
            item.reserve(f"o-{done}", 1)
            done += 1
        own.commit(events=uow.stored_events(), emitted=[], tracking={}, snapshots=uow.snapshots)
    system.start(store, OrderPlaced(order_id="o-next", customer_id="alice", sku=SKU, quantity=1, amount=100,
                                    address="1 Main St"), saga_id="s-next")
    store.close()


def restart(path: str, snapshots: bool) -> dict[str, Any]:
    """Run in a child process: open the store, start the inventory, handle the one new order; time it."""
    from choreo import Processor, open_store
    from services import inventory

    if not snapshots:
        inventory.service.snapshot_every = {}
    started = time.perf_counter()
    store = open_store(f"sqlite:///{path}")
    own = store.service("inventory")
    read = {"events": 0, "snapshots": 0}
    load, load_latest = own.load, own.load_latest

    def counted_load(agg_id: Any) -> Any:
        got = load(agg_id)
        read["events"] += len(got)
        return got

    def counted_latest(agg_id: Any) -> Any:
        snapshot, got = load_latest(agg_id)
        read["events"] += len(got)
        read["snapshots"] += snapshot is not None
        return snapshot, got

    own.load, own.load_latest = counted_load, counted_latest  # type: ignore[method-assign]
    proc = Processor(inventory.service, store)
    while proc.poll() == 0:
        pass
    elapsed = time.perf_counter() - started
    reserved = any(e.type == "ItemsReserved" for batch in store.scan() for e in batch)
    store.close()
    return {"restart_s": round(elapsed, 3), "events_read": read["events"], "snapshots_read": read["snapshots"],
            "handled": reserved}


def run(events: int, every: int = 1000) -> dict[str, Any]:
    """Build the store once, then restart the inventory on a copy of it, with and without snapshots."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inventory.db")
        started = time.perf_counter()
        build(path, events, every)
        results: dict[str, Any] = {"aggregate_events": events, "snapshot_every": every,
                                   "build_s": round(time.perf_counter() - started, 1)}
        for name, flag in (("with_snapshots", "yes"), ("without_snapshots", "no")):
            runs = []
            for i in range(ROUNDS):  # each on a fresh copy, in a fresh process; the median counts
                copy = os.path.join(tmp, f"{name}-{i}.db")
                shutil.copyfile(path, copy)
                out = subprocess.run([sys.executable, "-m", "benchmarks.snapshots", "--child", copy, flag],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout))
                os.remove(copy)
            runs.sort(key=lambda r: r["restart_s"])
            results[name] = {**runs[len(runs) // 2], "all_restart_s": [r["restart_s"] for r in runs]}
    results["speedup"] = round(results["without_snapshots"]["restart_s"] / results["with_snapshots"]["restart_s"], 1)
    return results


def table(r: dict[str, Any]) -> str:
    """The results as a few lines."""
    w, wo = r["with_snapshots"], r["without_snapshots"]
    return (f"restart to first handled event, one StockItem with {r['aggregate_events']} events\n"
            f"  with snapshots (every {r['snapshot_every']}): {w['restart_s']} s, {w['events_read']} events read\n"
            f"  without snapshots:          {wo['restart_s']} s, {wo['events_read']} events read\n"
            f"  {r['speedup']}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(restart(args.child[0], args.child[1] == "yes")))
        return
    results = run(args.events, args.every)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
