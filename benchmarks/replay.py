"""Replay benchmark: rebuild the saga projection from N events, next to plain sqlite3 and eventsourcing.

    python -m benchmarks.replay [--events 1000000] [--json]

It runs the example system for a few hundred sagas, copies their log rows under
new ids until the log holds N events, then measures, each in its own process
(so peak RSS is its own): plain sqlite3 reading every row, `eventsourcing` selecting
and decoding as many events from its notification log, and `SagaProjection.replay()`
in one process and with `workers=2` (two forked processes, by saga id; each rebuild
starts from a copy of the log that no projection has touched).
It reports events/s, the ratios, CPU seconds (with any worker processes'), and peak RSS
(the largest worker's apart: a rebuild of a large log forks one per CPU, up to 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
    started, cpu = time.perf_counter(), time.process_time()
    if kind == "eventsourcing":
        from benchmarks.es_decode import decode

        count = decode(path)
    elif kind == "sqlite3":
        conn = sqlite3.connect(path)
        count = sum(1 for _ in conn.execute("SELECT * FROM choreo_log ORDER BY position"))
    else:  # "projection" in one process (and its writer thread), or "projection_2_workers" in two forked ones
        from choreo import SagaProjection, open_store
        from services import system

        workers = 2 if kind == "projection_2_workers" else 1
        count = SagaProjection(open_store(f"sqlite:///{path}"), sagas=system.sagas, workers=workers).replay()
    elapsed = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # a rebuild's worker processes, if it forked any
    return {"events": count, "seconds": round(elapsed, 2), "events_per_s": round(count / elapsed),
            "cpu_s": round(time.process_time() - cpu + children.ru_utime + children.ru_stime, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "workers_peak_rss_mb": round(children.ru_maxrss / 1024, 1)}


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB.

    On Linux from VmHWM (`ru_maxrss` would report the parent's peak: it survives fork and exec).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


KINDS = ("sqlite3", "eventsourcing", "projection", "projection_2_workers")


def run(events: int) -> dict[str, object]:
    """Build the logs, then measure each reader in its own process; return the results."""
    from benchmarks.es_decode import build as build_es

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "replay.db")
        total = build(path, events)
        es_path = os.path.join(tmp, "eventsourcing.db")
        build_es(es_path, total)
        results: dict[str, object] = {"log_events": total}
        for kind in KINDS:
            if kind.startswith("projection"):  # each rebuild from a log that no projection has touched
                shutil.copyfile(path, path + ".copy")
            out = subprocess.run([sys.executable, "-m", "benchmarks.replay", "--child", kind,
                                  es_path if kind == "eventsourcing" else path],
                                 capture_output=True, text=True, check=True)
            results[kind] = json.loads(out.stdout)
            if kind.startswith("projection"):
                os.replace(path + ".copy", path)
    speed = {k: results[k]["events_per_s"] for k in KINDS}  # type: ignore[index]
    results["projection_over_sqlite3"] = round(speed["projection"] / speed["sqlite3"], 4)
    results["projection_over_eventsourcing"] = round(speed["projection"] / speed["eventsourcing"], 3)
    results["projection_2_workers_over_eventsourcing"] = round(
        speed["projection_2_workers"] / speed["eventsourcing"], 3)
    # CPU seconds (every thread and worker process) per event: less sensitive than wall time to a loaded machine
    cpu = {k: results[k]["cpu_s"] / results[k]["events"] for k in KINDS}  # type: ignore[index]
    results["projection_over_eventsourcing_cpu"] = round(cpu["eventsourcing"] / cpu["projection"], 3)
    results["projection_2_workers_over_eventsourcing_cpu"] = round(
        cpu["eventsourcing"] / cpu["projection_2_workers"], 3)
    return results


def table(results: dict[str, object]) -> str:
    """The results as a small table."""
    lines = [f"replay of {results['log_events']} events",
             f"  {'reader':<22} {'events/s':>10} {'seconds':>8} {'CPU s':>6} {'peak RSS MB (each worker)':>26}"]
    for kind in KINDS:
        r = results[kind]
        rss = f"{r['peak_rss_mb']} ({r['workers_peak_rss_mb']})" if r["workers_peak_rss_mb"] else r["peak_rss_mb"]  # type: ignore[index]
        lines.append(f"  {kind:<22} {r['events_per_s']:>10} {r['seconds']:>8} {r['cpu_s']:>6} {rss:>26}")  # type: ignore[index]
    lines.append(f"  projection / sqlite3 = {results['projection_over_sqlite3']}, "
                 f"projection / eventsourcing decode = {results['projection_over_eventsourcing']} "
                 f"(by CPU time per event: {results['projection_over_eventsourcing_cpu']}); with 2 worker processes "
                 f"{results['projection_2_workers_over_eventsourcing']} "
                 f"(by CPU time: {results['projection_2_workers_over_eventsourcing_cpu']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    results = run(args.events)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
