"""Replay benchmark: rebuild the saga projection from N events, next to plain sqlite3 reading them.

    python -m benchmarks.replay [--events 1000000] [--json]

It runs the example system for a few hundred sagas, copies their log rows under
new ids until the log holds N events, then measures, each in its own process
(so peak RSS is its own): plain sqlite3 reading every row, and
`SagaProjection.replay()`. It reports events/s, the ratio, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time

SEED_SAGAS = 500


def build(path: str, events: int) -> int:
    """Fill `path` with at least `events` log rows of real sagas; return the count."""
    from choreo import Runner, open_store
    from services import system
    from services.demo import plan

    store = open_store(f"sqlite:///{path}?durability=normal")
    runner = Runner(system, store)
    for saga_id, order, _, _ in plan(SEED_SAGAS, 1):
        runner.start(order, saga_id=saga_id)
    runner.run_until_idle()
    store.close()
    conn = sqlite3.connect(path)
    base = conn.execute("SELECT COUNT(*) FROM choreo_log").fetchone()[0]
    copies = -(-events // base) - 1
    for n in range(1, copies + 1):
        conn.execute(
            "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, "
            "outcome, occurred_at, payload) SELECT event_id || ?1, type, version, saga_id || ?1, "
            "CASE WHEN causation_id IS NULL THEN NULL ELSE causation_id || ?1 END, service, step, "
            "outcome, occurred_at, payload FROM choreo_log WHERE position <= ?2 ORDER BY position",
            (f"-{n}", base),
        )
        conn.commit()
    total = conn.execute("SELECT COUNT(*) FROM choreo_log").fetchone()[0]
    conn.close()
    return int(total)


def measure(kind: str, path: str) -> dict[str, float]:
    """Run in a child process: time one way of reading the whole log, and peak RSS."""
    started = time.perf_counter()
    if kind == "sqlite3":
        conn = sqlite3.connect(path)
        count = sum(1 for _ in conn.execute("SELECT * FROM choreo_log ORDER BY position"))
    else:
        from choreo import SagaProjection, open_store
        from services import system

        count = SagaProjection(open_store(f"sqlite:///{path}"), sagas=system.sagas).replay()
    elapsed = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"events": count, "seconds": round(elapsed, 2), "events_per_s": round(count / elapsed), "peak_rss_mb": round(rss_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "replay.db")
        total = build(path, args.events)
        results = {}
        for kind in ("sqlite3", "projection"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.replay", "--child", kind, path],
                                 capture_output=True, text=True, check=True)
            results[kind] = json.loads(out.stdout)
    results["ratio_projection_to_sqlite3"] = round(
        results["projection"]["events_per_s"] / results["sqlite3"]["events_per_s"], 4
    )
    results["log_events"] = total
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"replay of {total} events")
    print(f"  {'reader':<12} {'events/s':>10} {'seconds':>8} {'peak RSS MB':>12}")
    for kind in ("sqlite3", "projection"):
        r = results[kind]
        print(f"  {kind:<12} {r['events_per_s']:>10} {r['seconds']:>8} {r['peak_rss_mb']:>12}")
    print(f"  projection / sqlite3 = {results['ratio_projection_to_sqlite3']}")


if __name__ == "__main__":
    main()
