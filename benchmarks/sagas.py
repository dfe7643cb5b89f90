"""Sagas per second and saga latency (start to end) of the example system on any store.

    python -m benchmarks.sagas --store sqlite:///bench.db --sagas 2000 [--processes] [--json]
    python -m benchmarks.sagas --store kafka://127.0.0.1:9092 --processes
    python -m benchmarks.sagas --kafka-tansu --processes   # starts a tansu broker for the run

Throughput: N happy-path sagas are started at once and awaited. Latency: sagas are run
one after another (each started after the previous one ended) and p50/p99 reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from choreo import Runner, open_store
from choreo.store import EventStore, Feed, Interest
from services import system
from services.checks import END_TYPES
from services.contracts import OrderPlaced
from services.demo import spawn_services, stop_services


def happy_order(i: int) -> OrderPlaced:
    return OrderPlaced(order_id=f"bench-{uuid4()}", customer_id=f"customer-{i % 50}", sku="widget",
                       quantity=1, amount=100, address="1 Main St")


def _ends(feed: Feed, timeout: float) -> list[str]:
    return [e.saga_id for e in feed.poll(5000, timeout) if e.type in END_TYPES]


def _patient(store_url: str, store: EventStore) -> EventStore:
    """The store for the throughput run's reader of saga ends. On Kafka its fetches wait up to
    100 ms, so that it takes less CPU from the services; seeing an end late only lengthens the time."""
    return open_store(store_url, fetch_max_wait_ms=100) if store_url.startswith("kafka://") else store


def measure(store_url: str, sagas: int, sequential: int, processes: bool,
            spawn: Callable[[str], list[subprocess.Popen[bytes]]] | None = None,
            ready: Callable[[EventStore], bool] | None = None) -> dict[str, Any]:
    """Run the example's services on `store_url`; return sagas/s and latency percentiles.

    With `processes`, `spawn(store_url)` starts them (default: a process per service), and the
    run waits (up to a minute) until `ready(store)`, e.g. until replicas share their segments.
    """
    store = open_store(store_url)
    runner = None
    workers: list[subprocess.Popen[bytes]] = []
    if processes:
        workers = (spawn or spawn_services)(store_url)
        deadline = time.monotonic() + 60
        while ready is not None and not ready(store):
            if time.monotonic() > deadline:
                stop_services(workers)
                raise RuntimeError(f"the service processes on {store_url.split('?')[0]} were not ready in 60 s")
            time.sleep(0.05)
    else:
        runner = Runner(system, store)
        runner.start_threads()
    reader = _patient(store_url, store)
    feed = store.feed(f"bench-{uuid4()}", dict, group=False, interest=Interest(frozenset(END_TYPES)))
    try:
        # warm-up: one saga end to end (consumer groups joined, files open)
        system.start(store, happy_order(-1), saga_id=f"warm-{uuid4()}")
        while not _ends(feed, 0.5):
            pass
        latencies = []
        for i in range(sequential):
            saga_id = f"seq-{uuid4()}"
            t0 = time.perf_counter()
            system.start(store, happy_order(i), saga_id=saga_id)
            while saga_id not in _ends(feed, 0.5):
                pass
            latencies.append(time.perf_counter() - t0)
        feed.close()
        feed = reader.feed(f"bench-{uuid4()}", dict, group=False, interest=Interest(frozenset(END_TYPES)))
        ids = [f"thr-{uuid4()}" for _ in range(sagas)]
        t0 = time.perf_counter()
        system.start_many(store, [(happy_order(i), saga_id) for i, saga_id in enumerate(ids)])
        waiting = set(ids)
        while waiting:
            waiting.difference_update(_ends(feed, 0.5))
        elapsed = time.perf_counter() - t0
    finally:
        feed.close()
        if runner is not None:
            runner.stop()
        stop_services(workers)
        if reader is not store:
            reader.close()
        store.close()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "store": store_url.split("?")[0], "mode": "processes" if processes else "in-process",
        "sagas": sagas, "elapsed_s": round(elapsed, 3), "sagas_per_s": round(sagas / elapsed, 1),
        "sequential": sequential, "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sagas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    parser.add_argument("--kafka-tansu", action="store_true", help="start a tansu broker and use it")
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--sequential", type=int, default=200, help="sagas for the latency run")
    parser.add_argument("--processes", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        broker = None
        if args.kafka_tansu:
            from choreo.tansu import TansuBroker

            broker = TansuBroker(tmp).start()
            url = f"kafka://{broker.bootstrap}?topic=bench-{uuid4().hex[:8]}&state={tmp}/state"
        else:
            url = args.store or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        try:
            result = measure(url, args.sagas, args.sequential, args.processes)
        finally:
            if broker is not None:
                broker.stop()
    print(json.dumps(result) if args.json else
          "  ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
