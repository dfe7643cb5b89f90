"""Run choreo's benchmark suite: every figure next to a baseline measured in the same run.

    python -m benchmarks            # the full run (about 4½ minutes here)
    python -m benchmarks --quick    # a small run
    python -m benchmarks --json     # the results as JSON on stdout

1. sagas/s on SQLite, all services in one process: choreo / eventsourcing System (the faster of its
   SingleThreadedRunner and NewSingleThreadedRunner; both in the JSON); events/s / plain sqlite3
2. sagas/s on SQLite, each service in its own process
3. sagas/s on Kafka (a tansu broker started for the run), each service in its own process
4. saga latency p50/p99 (sequential sagas) for 1-3; and in one thread, one saga at a time:
   choreo's Runner.run_until_idle / eventsourcing's faster runner (`benchmarks.latency`)
5. projection replay events/s / plain sqlite3 and / eventsourcing's decode (also by CPU time); peak RSS
6. I/O-bound steps (each waits 10 ms): choreo async / sync + threads / concurrency 1 / eventsourcing System, vs 1
7. sagas/s and p50/p99 on PostgreSQL (a cluster started for the run), each service in its own process, vs 2
8. sagas/s and p50/p99 with 1, 2 and 3 replicas of each step service, on SQLite and on PostgreSQL
9. restart to first handled event, one aggregate with 100k events (10k quick): with / without snapshots

The results are also written to `--out` (default: benchmark-results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any
from uuid import uuid4

from benchmarks import io_bound, latency, postgres, replay, replicas, sagas, snapshots, throughput


def run(quick: bool) -> dict[str, Any]:
    n = 500 if quick else 2000
    sequential = 50 if quick else 200
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "quick": quick,
    }
    results["1_sqlite_one_process"] = throughput.measure(n, rounds=2 if quick else 3)
    results["4_latency_in_process_sequential"] = latency.measure(sequential, rounds=2 if quick else 3)
    results["6_io_bound"] = io_bound.measure(n, sequential // 2, results["1_sqlite_one_process"]["choreo_sagas_per_s"])
    with tempfile.TemporaryDirectory() as folder:
        results["4_latency_sqlite_one_process"] = sagas.measure(
            f"sqlite:///{folder}/threads.db", sagas=n, sequential=sequential, processes=False)
        results["2_sqlite_processes"] = sagas.measure(
            f"sqlite:///{folder}/processes.db", sagas=n, sequential=sequential, processes=True)
        from choreo.tansu import TansuBroker

        with TansuBroker(folder) as broker:
            url = f"kafka://{broker.bootstrap}?topic=bench-{uuid4().hex[:8]}&state={folder}/state"
            results["3_kafka_processes"] = sagas.measure(url, sagas=n, sequential=sequential, processes=True)
    results["7_postgres_processes"] = postgres.measure(n, sequential, sqlite=results["2_sqlite_processes"])
    results["8_replicas"] = replicas.measure(n // 2, sequential // 2)
    results["5_replay"] = replay.run(100_000 if quick else 1_000_000)
    results["9_snapshots"] = snapshots.run(10_000 if quick else 100_000)
    return results


def table(r: dict[str, Any]) -> str:
    one, rp = r["1_sqlite_one_process"], r["5_replay"]
    rows = [
        ("1 SQLite, one process: choreo", f"{one['choreo_sagas_per_s']} sagas/s",
         f"{one['choreo_over_baseline']}x eventsourcing System, {one['baseline_runner']} runner "
         f"({one['baseline_sagas_per_s']} sagas/s; single_threaded {one['baseline_single_threaded_sagas_per_s']}, "
         f"new_single_threaded {one['baseline_new_single_threaded_sagas_per_s']})"),
        ("  events/s vs plain sqlite3", f"{one['choreo_events_per_s']} events/s",
         f"{one['choreo_over_sqlite3_events']}x sqlite3 inserts ({one['sqlite3_events_per_s']}/s)"),
    ]
    for key, name in (("4_latency_sqlite_one_process", "4 SQLite, one process (threads)"),
                      ("2_sqlite_processes", "2 SQLite, a process per service"),
                      ("3_kafka_processes", "3 Kafka, a process per service")):
        m = r[key]
        rows.append((name, f"{m['sagas_per_s']} sagas/s", f"p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms"))
    lat = r["4_latency_in_process_sequential"]
    rows.append(("4 one thread, one saga at a time: choreo", f"p50 {lat['choreo_p50_ms']} ms",
                 f"{lat['choreo_p50_over_baseline_p50']}x eventsourcing {lat['baseline_runner']} "
                 f"(p50 {lat['eventsourcing_' + lat['baseline_runner'] + '_p50_ms']} ms); p99 {lat['choreo_p99_ms']} "
                 f"ms; single_threaded p50 {lat['eventsourcing_single_threaded_p50_ms']} ms, new_single_threaded "
                 f"p50 {lat['eventsourcing_new_single_threaded_p50_ms']} ms"))
    w2 = rp["projection_2_workers"]
    rows.append(("5 replay: projection, 2 worker processes", f"{w2['events_per_s']} events/s",
                 f"{rp['projection_2_workers_over_eventsourcing']}x eventsourcing decode "
                 f"({rp['projection_2_workers_over_eventsourcing_cpu']}x by CPU time per event), peak RSS "
                 f"{w2['peak_rss_mb']} MB + {w2['workers_peak_rss_mb']} MB per worker"))
    rows.append(("5 replay: projection, one process", f"{rp['projection']['events_per_s']} events/s",
                 f"{rp['projection_over_eventsourcing']}x eventsourcing decode "
                 f"({rp['eventsourcing']['events_per_s']}/s; {rp['projection_over_eventsourcing_cpu']}x by CPU "
                 f"time per event), {rp['projection_over_sqlite3']}x sqlite3 "
                 f"({rp['sqlite3']['events_per_s']}/s), peak RSS {rp['projection']['peak_rss_mb']} MB "
                 f"at {rp['log_events']} events"))
    rows.append(("6 I/O-bound: 4 steps wait 10 ms each", "", f"x CPU-only = / benchmark 1's choreo "
                 f"({r['6_io_bound']['cpu_only_sagas_per_s']} sagas/s)"))
    rows += io_bound.rows(r["6_io_bound"])
    rows += postgres.rows(r["7_postgres_processes"])
    rows += replicas.rows(r["8_replicas"])
    sn = r["9_snapshots"]
    rows.append((f"9 restart, {sn['aggregate_events']} events on one aggregate",
                 f"{sn['with_snapshots']['restart_s']} s",
                 f"with snapshots every {sn['snapshot_every']}; {sn['without_snapshots']['restart_s']} s without "
                 f"({sn['speedup']}x)"))
    width = max(len(a) for a, _, _ in rows)
    return "\n".join([f"choreo benchmarks ({r['machine']}{', quick' if r['quick'] else ''})"] +
                     [f"  {a:<{width}}  {b:>18}  {c}" for a, b, c in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (under 3 minutes here)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", default="benchmark-results.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args.quick)
    results["total_s"] = round(time.perf_counter() - started, 1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2) if args.json else table(results))
    print(f"({results['total_s']} s; JSON in {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
