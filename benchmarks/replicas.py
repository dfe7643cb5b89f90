"""Benchmark 8: replicas of the step services, 1, 2 and 3 of each, on SQLite and PostgreSQL (same run).

    python -m benchmarks.replicas            # the example on both stores, then the waiting echo
    python -m benchmarks.replicas --quick

1. The example (4-step saga, CPU-light handlers), a process per service, each step service
   (inventory, payment, shipping, notification) run as 1, 2 or 3 `choreo run` replicas
   (`--segments 16`), orders as one process: sagas/s (N sagas started at once) and the p50/p99
   of sagas run one after another, on one SQLite file and on PostgreSQL (a throwaway cluster,
   fsync on; skipped, saying why, without the server binaries or psycopg).
2. `tests.replica_system:echo` whose handler waits 10 ms (a call to another system), on SQLite
   and PostgreSQL: 1, 2, 3 replicas; N pings of N sagas, answers/s. (Not in `python -m benchmarks`.)

Part 1 is benchmark 8 of `python -m benchmarks` (`measure()`).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import sagas
from choreo import open_store
from choreo.store import EventStore

#: the services whose handlers are the saga's steps: each run as replicas
STEP_SERVICES = ("inventory", "payment", "shipping", "notification")
SEGMENTS = 16


def spawner(replicas: int) -> Callable[[str], list[subprocess.Popen[bytes]]]:
    """Start the example on a store: `replicas` processes of each step service, one of each other."""
    from services import TARGETS

    def spawn(url: str) -> list[subprocess.Popen[bytes]]:
        checkout = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)}
        procs = []
        for name, target in TARGETS.items():
            split = name in STEP_SERVICES
            for _ in range(replicas if split else 1):
                extra = ["--segments", str(SEGMENTS)] if split else []
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "choreo", "run", target, "--store", url, "--log-level", "WARNING", *extra],
                    stdin=subprocess.DEVNULL, env=env))
        return procs
    return spawn


def shared(replicas: int) -> Callable[[EventStore], bool]:
    """Whether every step service's segments are all held, by `replicas` live replicas."""
    def ready(store: EventStore) -> bool:
        for name in STEP_SERVICES:
            own = store.service(name)
            if own.segments() != SEGMENTS:
                return False
            state = own.claims(SEGMENTS)
            owners = [c.owner for c in state.claims if c.owner and c.expires_at >= state.now]
            if len(owners) != SEGMENTS or len(set(owners)) != replicas:
                return False
        return True
    return ready


def measure(n: int, sequential: int, counts: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    """Sagas/s and p50/p99 with 1, 2, 3 replicas of each step service, on SQLite and on PostgreSQL."""
    result: dict[str, Any] = {"sagas": n, "sequential": sequential, "load_1min": round(os.getloadavg()[0], 1),
                              "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as folder:
        result["sqlite"] = {
            str(k): sagas.measure(f"sqlite:///{folder}/replicas-{k}.db", sagas=n, sequential=sequential,
                                  processes=True, spawn=spawner(k), ready=shared(k)) for k in counts}
    try:
        import psycopg  # noqa: F401

        from choreo.pgcluster import PostgresCluster, PostgresUnavailable

        cluster = PostgresCluster(fsync=True)
    except (ImportError, PostgresUnavailable) as e:
        result["postgres"] = {"skipped": f"PostgreSQL cannot run here: {e}"}
        return result
    with cluster:
        result["postgres"] = {
            str(k): sagas.measure(cluster.url(cluster.create_database()), sagas=n, sequential=sequential,
                                  processes=True, spawn=spawner(k), ready=shared(k)) for k in counts}
    return result


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table rows of `python -m benchmarks` for this benchmark."""
    out = [("8 replicas of each step service", "", f"a process each; load {r['load_1min']} on {r['cpus']} CPUs")]
    for backend, title in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
        got = r[backend]
        if "skipped" in got:
            out.append((f"  {title}", "skipped", got["skipped"]))
            continue
        one = got["1"]["sagas_per_s"]
        for k, m in got.items():
            out.append((f"  {title}, {k} replica(s)", f"{m['sagas_per_s']} sagas/s",
                        f"p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms; {m['sagas_per_s'] / one:.2f}x 1 replica"))
    return out


def _sql(url: str, query: str) -> int:
    """One number from the store's database (SQLite or PostgreSQL); 0 if a table is missing."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///"):], timeout=30)
        try:
            return int(conn.execute(query).fetchone()[0] or 0)
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()
    import psycopg

    from choreo.stores.postgres import parse_url

    with psycopg.connect(parse_url(url)[0], autocommit=True) as pg:
        try:
            row = pg.execute(query).fetchone()  # type: ignore[arg-type]
            return int(row[0] or 0) if row else 0
        except psycopg.errors.UndefinedTable:
            return 0


def _run(url: str, targets: list[tuple[str, int]], split: list[str], start: object, done: tuple[str, ...], n: int,
         env: dict[str, str]) -> float:
    """Start the processes on `url`, wait until the split services are shared, start the work; return items/s."""
    open_store(url).close()
    procs = [subprocess.Popen([sys.executable, "-m", "choreo", "run", target, "--store", url, "--log-level",
                               "WARNING"], env=env, stdin=subprocess.DEVNULL)
             for target, copies in targets for _ in range(copies)]
    types = ", ".join(f"'{t}'" for t in done)
    try:
        copies = max(c for _, c in targets)
        deadline = time.monotonic() + 60
        while any(_sql(url, f"SELECT COUNT(DISTINCT owner) FROM svc_{s}_claims") < copies for s in split) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        store = open_store(url)
        began = time.perf_counter()
        start(store)  # type: ignore[operator]
        while _sql(url, f"SELECT COUNT(*) FROM choreo_log WHERE type IN ({types})") < n:
            time.sleep(0.01)
        elapsed = time.perf_counter() - began
        store.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    return n / elapsed


def _echo(urls: list[tuple[str, str]], pings: int, env: dict[str, str]) -> None:
    """Part 2: the echo that waits 10 ms per ping, 1-3 replicas, on each store (a fresh one each run)."""
    import tests.replica_system as rs

    for name, url_of in urls:
        for k in (1, 2, 3):
            rate = _run(url_of(k), [("tests.replica_system:echo", k)], ["echo"],  # type: ignore[operator]
                        lambda store: store.append([rs.ping(f"s{i}", 0) for i in range(pings)]),
                        ("EchoPong",), pings, {**env, "ECHO_DELAY": "0.01"})
            print(f"{name}: echo waiting 10 ms per ping, {k} replica(s): {rate:.0f} answers/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 500 if args.quick else 1500
    print(f"load: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
    result = measure(n, 50 if args.quick else 200)
    width = max(len(a) for a, _, _ in rows(result))
    print("\n".join(f"{a:<{width}}  {b:>16}  {c}" for a, b, c in rows(result)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as folder:
        urls: list[tuple[str, Any]] = [("SQLite", lambda k: f"sqlite:///{folder}/echo-{k}.db")]
        if "skipped" in result["postgres"]:
            _echo(urls, n // 2, env)
            return
        from choreo.pgcluster import PostgresCluster

        with PostgresCluster(fsync=True) as cluster:
            urls.append(("PostgreSQL", lambda k: cluster.url(cluster.create_database())))
            _echo(urls, n // 2, env)
    print(f"load: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
