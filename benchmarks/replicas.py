"""Replicas on one SQLite file: sagas/s with 1, 2 and 3 replicas, and the failover time.

    python -m benchmarks.replicas            # the example and the waiting echo, 1-3 replicas
    python -m benchmarks.replicas --quick

1. The example (4-step saga, CPU-light handlers): 1, 2, 3 `choreo run` replicas of payment and
   inventory (the services that declare segments), one process of each other service; N sagas
   started at once, sagas/s until the last one ends.
2. `tests.replica_system:echo` whose handler waits 10 ms (a call to another system): 1, 2, 3
   replicas; N pings of N sagas, answers/s.
Not part of `python -m benchmarks` (a separate run: it starts up to 9 processes).
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from choreo import open_store


def _count(path: Path, types: tuple[str, ...]) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        marks = ",".join("?" * len(types))
        return int(conn.execute(f"SELECT COUNT(*) FROM choreo_log WHERE type IN ({marks})", types).fetchone()[0])
    finally:
        conn.close()


def _owners(path: Path, service: str) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return int(conn.execute(f"SELECT COUNT(DISTINCT owner) FROM svc_{service}_claims").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _run(targets: list[tuple[str, int]], split: list[str], start: object, done: tuple[str, ...], n: int,
         env: dict[str, str]) -> float:
    """Start the processes, wait until the split services are shared, start the work; return items/s."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.db"
        url = f"sqlite:///{path}"
        open_store(url).close()
        procs = [subprocess.Popen([sys.executable, "-m", "choreo", "run", target, "--store", url, "--log-level",
                                   "WARNING"], env=env, stdin=subprocess.DEVNULL)
                 for target, copies in targets for _ in range(copies)]
        try:
            copies = max(c for _, c in targets)
            deadline = time.monotonic() + 60
            while any(_owners(path, s) < copies for s in split) and time.monotonic() < deadline:
                time.sleep(0.05)
            store = open_store(url)
            began = time.perf_counter()
            start(store)  # type: ignore[operator]
            while _count(path, done) < n:
                time.sleep(0.01)
            elapsed = time.perf_counter() - began
            store.close()
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(30)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 500 if args.quick else 1500
    from services import TARGETS, system
    from services.demo import plan

    import tests.replica_system as rs

    print(f"load: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    planned = plan(n, seed=21)
    for k in (1, 2, 3):
        rate = _run([(t, k if name in ("payment", "inventory") else 1) for name, t in TARGETS.items()],
                    ["payment", "inventory"],
                    lambda store: system.start_many(store, [(o, s) for s, o, _, _ in planned]),
                    ("OrderConfirmed", "OrderCancelled"), n, env)
        print(f"example, {k} replica(s) of payment and inventory: {rate:.0f} sagas/s")
    pings = n // 2
    for k in (1, 2, 3):
        rate = _run([("tests.replica_system:echo", k)], ["echo"],
                    lambda store: store.append([rs.ping(f"s{i}", 0) for i in range(pings)]),
                    ("EchoPong",), pings, {**env, "ECHO_DELAY": "0.01"})
        print(f"echo waiting 10 ms per ping, {k} replica(s): {rate:.0f} answers/s")


if __name__ == "__main__":
    main()
