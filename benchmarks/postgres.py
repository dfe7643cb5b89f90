"""Benchmark 7: the example system on PostgreSQL, a process per service, next to SQLite in the same run.

    python -m benchmarks.postgres [--sagas 2000] [--sequential 200] [--json]

A throwaway PostgreSQL cluster (`choreo.pgcluster`, durable: fsync and synchronous_commit on,
as SQLite's default `synchronous=FULL`) is started for the run; each example service runs as
its own `choreo run` process on it (`benchmarks.sagas`), over TCP on the loopback, then over the
Unix socket. SQLite with a process per service is measured in the same run for the ratio
(benchmark 2, reused when `python -m benchmarks` measured it already). The target for
PostgreSQL is a p50 of at most 20 ms for the 4-step saga.

Skipped, saying why, when the PostgreSQL server binaries or psycopg are not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

from benchmarks import sagas

TARGET_P50_MS = 20.0


def measure(n: int, sequential: int, sqlite: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sagas/s and p50/p99 on PostgreSQL (TCP and Unix socket) and on SQLite, each a process per service."""
    try:
        import psycopg  # noqa: F401

        from choreo.pgcluster import PostgresCluster, PostgresUnavailable

        cluster = PostgresCluster(fsync=True)
    except (ImportError, PostgresUnavailable) as e:
        return {"skipped": f"PostgreSQL cannot run here: {e}"}
    with tempfile.TemporaryDirectory() as folder:
        if sqlite is None:
            sqlite = sagas.measure(f"sqlite:///{os.path.join(folder, 'processes.db')}", sagas=n,
                                   sequential=sequential, processes=True)
        with cluster:
            tcp = sagas.measure(cluster.url(cluster.create_database()), sagas=n, sequential=sequential,
                                processes=True)
            unix = sagas.measure(cluster.url(cluster.create_database(), socket=True), sagas=n,
                                 sequential=sequential, processes=True)
    return {
        "sagas": n, "sequential": sequential,
        "postgres_tcp": tcp, "postgres_unix_socket": unix, "sqlite": sqlite,
        "tcp_over_sqlite_sagas_per_s": round(tcp["sagas_per_s"] / sqlite["sagas_per_s"], 2),
        "tcp_p50_over_sqlite_p50": round(tcp["p50_ms"] / sqlite["p50_ms"], 2),
        "target_p50_ms": TARGET_P50_MS,
        "p50_within_target": min(tcp["p50_ms"], unix["p50_ms"]) <= TARGET_P50_MS,
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table rows of `python -m benchmarks` for this benchmark."""
    title = "7 PostgreSQL, a process per service"
    if "skipped" in r:
        return [(title, "skipped", r["skipped"])]
    out = []
    for key, name in (("postgres_tcp", "  over TCP (loopback)"), ("postgres_unix_socket", "  over the Unix socket"),
                      ("sqlite", "  SQLite, same run")):
        m = r[key]
        out.append((name, f"{m['sagas_per_s']} sagas/s", f"p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms"))
    verdict = "met" if r["p50_within_target"] else "NOT met"
    return [(title, "", f"target p50 <= {r['target_p50_ms']:g} ms: {verdict}; TCP / SQLite: "
             f"{r['tcp_over_sqlite_sagas_per_s']}x sagas/s, {r['tcp_p50_over_sqlite_p50']}x p50"), *out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postgres", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--sequential", type=int, default=200, help="sagas for the latency run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.sagas, args.sequential)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(a) for a, _, _ in rows(result))
        print("\n".join(f"{a:<{width}}  {b:>16}  {c}" for a, b, c in rows(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
