"""Benchmark 1: sagas/s on SQLite with durable defaults, all services in one process, side by side.

- choreo: N happy-path sagas started, then run to the end by the single-threaded `Runner`
  (`run_until_idle`), like eventsourcing's `SingleThreadedRunner`;
- baseline: the same choreography on eventsourcing's System (`benchmarks.baseline`), with each of
  its in-process runners (`SingleThreadedRunner`, `NewSingleThreadedRunner`); choreo is compared
  with the faster of the two, and both are kept in the results;
- limit: plain sqlite3 inserting as many events (WAL, `synchronous=FULL`, batches of 100).

The three run alternately, `--rounds` times, in this one process; the best round of each counts.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from typing import Any
from uuid import uuid4

from benchmarks import baseline
from benchmarks.sagas import happy_order


def choreo_round(sagas: int, folder: str) -> dict[str, Any]:
    from choreo import Runner, open_store
    from services import system

    store = open_store(f"sqlite:///{os.path.join(folder, f'choreo-{uuid4().hex[:6]}.db')}")
    runner = Runner(system, store)
    started = time.perf_counter()
    system.start_many(store, [(happy_order(i), None) for i in range(sagas)])
    runner.run_until_idle()
    elapsed = time.perf_counter() - started
    events = store.last_position()  # type: ignore[attr-defined]
    store.close()
    return {"sagas_per_s": round(sagas / elapsed, 1), "events": events, "events_per_s": round(events / elapsed)}


def sqlite3_limit(events: int, folder: str) -> dict[str, Any]:
    """Plain sqlite3: insert `events` rows shaped like the log, 100 per transaction, WAL, synchronous=FULL."""
    conn = sqlite3.connect(os.path.join(folder, f"plain-{uuid4().hex[:6]}.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE log (position INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, "
                 "type TEXT, saga_id TEXT, payload TEXT)")
    payload = happy_order(0).model_dump_json()
    started = time.perf_counter()
    for start in range(0, events, 100):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO log (event_id, type, saga_id, payload) VALUES (?, 'OrderPlaced', 's', ?)",
                         [(str(uuid4()), payload) for _ in range(start, min(events, start + 100))])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return {"events": events, "events_per_s": round(events / elapsed)}


def measure(sagas: int, rounds: int) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(rounds):
            c = choreo_round(sagas, folder)
            runs = [("choreo", c, "sagas_per_s")]
            for runner in baseline.RUNNERS:
                runs.append((runner, baseline.measure(sagas, tempfile.mkdtemp(dir=folder), runner), "sagas_per_s"))
            runs.append(("sqlite3", sqlite3_limit(c["events"], folder), "events_per_s"))
            for name, r, key in runs:
                if name not in best or r[key] > best[name][key]:
                    best[name] = r
    fastest = max(baseline.RUNNERS, key=lambda runner: best[runner]["sagas_per_s"])
    return {
        "sagas": sagas, "rounds": rounds,
        "choreo_sagas_per_s": best["choreo"]["sagas_per_s"],
        **{f"baseline_{runner}_sagas_per_s": best[runner]["sagas_per_s"] for runner in baseline.RUNNERS},
        "baseline_runner": fastest,  # the faster of eventsourcing's runners: the one choreo is compared with
        "baseline_sagas_per_s": best[fastest]["sagas_per_s"],
        "choreo_over_baseline": round(best["choreo"]["sagas_per_s"] / best[fastest]["sagas_per_s"], 2),
        "choreo_events_per_s": best["choreo"]["events_per_s"],
        "sqlite3_events_per_s": best["sqlite3"]["events_per_s"],
        "choreo_over_sqlite3_events": round(best["choreo"]["events_per_s"] / best["sqlite3"]["events_per_s"], 3),
    }
