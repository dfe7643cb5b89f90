"""Replicas as real processes on one SQLite file or one PostgreSQL database: `choreo run` started several
times splits the work; a joining replica gets segments; a killed replica's segments are taken over and
nothing is lost or done twice; a replica paused past its lease cannot commit.

The failover and rebalance times these tests measure are printed (run with `-s` to see them).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tests.replica_system as rs
from choreo import open_store, segment_of
from services import TARGETS, system
from services.checks import check_invariants, read_facts
from services.demo import plan

pytestmark = pytest.mark.slow
ECHO = "tests.replica_system:echo"


class Cluster:
    """Service processes on one store (a SQLite file, or a PostgreSQL database: `url`), each logging to its own file."""

    def __init__(self, folder: Path, url: str | None = None) -> None:
        self.folder = folder
        self.path = folder / "replicas.db"
        self.url = url or f"sqlite:///{self.path}"
        self.postgres = url is not None
        self.procs: list[subprocess.Popen[bytes]] = []
        open_store(self.url).close()  # the store exists before any reader looks at it

    def spawn(self, target: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"proc-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "choreo", "run", target, "--store", self.url, *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run `sql` (parameters marked `?`) on the store's database; no rows if a table is missing."""
        if self.postgres:
            return self._pg_query(sql.replace("?", "%s"), params)
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        finally:
            conn.close()

    def _pg_query(self, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        import psycopg

        from choreo.stores.postgres import parse_url

        with psycopg.connect(parse_url(self.url)[0], autocommit=True) as conn:
            try:
                return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
            except psycopg.errors.UndefinedTable:
                return []

    def owners(self, service: str) -> dict[int, str | None]:
        """Each segment's owner (None: free or expired)."""
        now = ("extract(epoch FROM clock_timestamp())" if self.postgres
               else "(julianday('now') - 2440587.5) * 86400.0")
        rows = self.query(f"SELECT segment, CASE WHEN expires_at >= {now} "
                          f"THEN owner END FROM svc_{service}_claims")
        return {int(s): o for s, o in rows}  # type: ignore[misc, call-overload]

    def count(self, types: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(types))
        return int(self.query(f"SELECT COUNT(*) FROM choreo_log WHERE type IN ({marks})", types)[0][0])  # type: ignore[call-overload]

    def stop(self) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return [p.wait(30) for p in self.procs]

    def logs(self) -> str:
        return "\n".join(f.read_text(errors="replace") for f in sorted(self.folder.glob("proc-*.log")))


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Processes on SQLite, or (parametrized indirectly with "postgres") on a fresh PostgreSQL database."""
    backend = getattr(request, "param", "sqlite")
    c = Cluster(tmp_path, request.getfixturevalue("postgres_url") if backend == "postgres" else None)
    yield c
    for p in c.procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_for(what: str, check: Callable[[], bool], timeout: float, cluster: Cluster) -> float:
    """Wait until `check()`; return the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting until {what}\n{cluster.logs()[-5000:]}")
        dead = [p for p in cluster.procs if p.returncode is None and p.poll() not in (None, -9)]
        assert not dead, f"a service process exited with {dead[0].returncode}\n{cluster.logs()[-5000:]}"
        time.sleep(0.02)
    return time.monotonic() - start


def balanced(cluster: Cluster, service: str, replicas: int, segments: int) -> Callable[[], bool]:
    """Every segment held, by `replicas` replicas, none above its fair share (so each holds some)."""
    fair = -(-segments // replicas)

    def check() -> bool:
        owners = cluster.owners(service)
        held = [o for o in owners.values() if o]
        shares = {o: held.count(o) for o in held}
        return len(held) == segments and len(shares) == replicas and max(shares.values()) <= fair
    return check


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_started_one_by_one_rebalance_and_split_the_sagas_each_in_order(
        cluster: Cluster, replicas: int) -> None:
    for k in range(1, replicas + 1):  # each joining replica gets a fair share
        cluster.spawn(ECHO, "--lease", "1")
        took = wait_for(f"{k} replicas share the segments", balanced(cluster, "echo", k, rs.SEGMENTS), 20, cluster)
        print(f"\nreplica {k} joined: segments rebalanced in {took:.2f}s (lease 1s)")
    store = open_store(cluster.url)
    sagas = [f"saga-{i}" for i in range(120)]
    for n in range(5):  # the sagas' pings interleaved in the log
        store.append([rs.ping(s, n) for s in sagas])
    wait_for("every ping is answered", lambda: cluster.count(("EchoPong",)) >= 5 * len(sagas), 60, cluster)
    assert cluster.stop() == [0] * replicas  # SIGTERM: each finishes its batch and frees its segments
    got = rs.pongs(store)
    for s in sagas:
        assert [p.n for p in got[s]] == [0, 1, 2, 3, 4], s  # each ping once, in log order
        assert len({p.pid for p in got[s]}) == 1, s  # by one replica
    pids = {p.pid for pongs in got.values() for p in pongs}
    assert pids == {p.pid for p in cluster.procs}  # every replica did its share
    assert cluster.owners("echo") == {s: None for s in range(rs.SEGMENTS)}  # all freed at the stop
    store.close()


def test_a_replica_killed_on_this_host_is_taken_over_before_its_lease_ends(cluster: Cluster) -> None:
    a = cluster.spawn(ECHO, "--lease", "6")
    wait_for("a holds every segment", balanced(cluster, "echo", 1, rs.SEGMENTS), 20, cluster)
    cluster.spawn(ECHO, "--lease", "6")
    wait_for("two replicas share the segments", balanced(cluster, "echo", 2, rs.SEGMENTS), 30, cluster)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    took = wait_for("b holds every segment", balanced(cluster, "echo", 1, rs.SEGMENTS), 20, cluster)
    print(f"\nkill -9 on this host: segments taken over in {took:.2f}s (lease 6s)")
    assert took < 6  # b saw a's process gone: it did not wait for the lease
    store = open_store(cluster.url)
    store.append([rs.ping(f"s{i}", 0) for i in range(40)])
    wait_for("every ping is answered", lambda: cluster.count(("EchoPong",)) >= 40, 30, cluster)
    store.close()


@pytest.mark.parametrize("cluster", ["sqlite", "postgres"], indirect=True)
def test_1000_sagas_3_replicas_of_payment_and_inventory_one_of_each_killed_mid_run(cluster: Cluster) -> None:
    """The issue's kill test: 3 replicas of each step service that has segments,
    one of each killed with SIGKILL while sagas are in flight; their segments are taken over once
    their lease ends (`--wait-lease`); every saga ends as planned, 0 lost, 0 duplicated effects."""
    lease = 1.5
    split = ("payment", "inventory")
    replicas: dict[str, list[subprocess.Popen[bytes]]] = {}
    for name, target in TARGETS.items():
        copies = 3 if name in split else 1
        replicas[name] = [cluster.spawn(target, "--lease", str(lease), "--wait-lease") if copies > 1
                          else cluster.spawn(target) for _ in range(copies)]
    for name in split:
        wait_for(f"3 replicas of {name} share its segments", balanced(cluster, name, 3, 16), 30, cluster)
    store = open_store(cluster.url)
    planned = plan(1000, seed=13)
    saga_ids = {s for s, *_ in planned}
    ends = ("OrderConfirmed", "OrderCancelled")
    system.start_many(store, [(order, saga_id) for saga_id, order, _, _ in planned])
    wait_for("the first sagas end", lambda: cluster.count(ends) >= 100, 60, cluster)
    victims = {}
    for name in split:
        owners = cluster.owners(name)
        proc = replicas[name][0]
        os.kill(proc.pid, signal.SIGKILL)
        victims[name] = (proc, [s for s, o in owners.items() if o and f":{proc.pid}#" in o])
    killed_at = time.monotonic()
    for proc, _ in victims.values():
        proc.wait()  # dead: what it committed is all in the log now
    in_flight = len(saga_ids) - cluster.count(ends)
    head = int(cluster.query("SELECT MAX(position) FROM choreo_log")[0][0])  # type: ignore[call-overload]
    assert in_flight > 0, "every saga ended before the kill; nothing was tested"

    def taken_over() -> bool:  # every segment of a killed replica is held by a live one
        return all(all((o := cluster.owners(name)[s]) and f":{proc.pid}#" not in o for s in segments)
                   for name, (proc, segments) in victims.items())

    taken = wait_for("the killed replicas' segments are taken over", taken_over, 30, cluster)
    flowing: dict[str, float] = {}

    def dead_segments_flow() -> bool:  # a saga of a killed replica's segment moved on in its service
        for name, (_, segments) in victims.items():
            if name not in flowing and any(segment_of(str(saga), 16) in segments for (saga,) in cluster.query(
                    "SELECT saga_id FROM choreo_log WHERE position > ? AND service = ?", (head, name))):
                flowing[name] = time.monotonic() - killed_at
        return len(flowing) == len(victims)

    wait_for("sagas of the taken segments flow again", dead_segments_flow, 30, cluster)
    wait_for("every saga ends", lambda: cluster.count(ends) >= len(saga_ids), 120, cluster)
    print(f"\nkill -9 of a payment and an inventory replica ({in_flight} sagas in flight, lease {lease}s): "
          f"segments taken {taken:.2f}s after the kill; sagas of those segments flowing again after "
          + ", ".join(f"{n} {t:.2f}s" for n, t in flowing.items()))
    codes = cluster.stop()
    assert [c for c in codes if c != -signal.SIGKILL] == [0] * (len(codes) - 2)
    facts = read_facts(store, saga_ids)
    invariants = check_invariants(store, facts)
    assert all(invariants.values()), invariants  # 0 duplicated effects: one capture, stock and money exact
    for saga_id, _, state, cause in planned:  # 0 lost: every saga ended as planned
        assert (facts[saga_id].state, facts[saga_id].cause) == (state, cause), saga_id
    store.close()


@pytest.mark.parametrize("cluster", ["sqlite", "postgres"], indirect=True)
def test_a_replica_paused_past_its_lease_cannot_commit_its_batch_when_it_resumes(cluster: Cluster) -> None:
    """SIGSTOP a replica in the middle of a slow batch: the other takes its segments once the lease
    ends; at SIGCONT its commit is refused (ClaimLost, nothing written) and each ping is answered once."""
    os.environ["ECHO_DELAY"] = "0.02"  # each answer waits 20 ms: a batch takes a while
    try:
        a = cluster.spawn(ECHO, "--lease", "1", "--wait-lease")
        wait_for("a holds every segment", balanced(cluster, "echo", 1, rs.SEGMENTS), 20, cluster)
        store = open_store(cluster.url)
        store.append([rs.ping(f"s{i}", 0) for i in range(150)])
        wait_for("a answers", lambda: cluster.count(("EchoPong",)) > 0, 30, cluster)
        store.append([rs.ping(f"s{i}", 1) for i in range(150)])
        time.sleep(0.2)  # a is in the middle of handling the second wave
        os.kill(a.pid, signal.SIGSTOP)
        b = cluster.spawn(ECHO, "--lease", "1", "--wait-lease")
        took = wait_for("b takes every segment", lambda: all(
            o and f":{b.pid}#" in o for o in cluster.owners("echo").values()), 30, cluster)
        print(f"\na paused: b took its segments {took:.2f}s after it started (lease 1s)")
        os.kill(a.pid, signal.SIGCONT)
        wait_for("every ping is answered", lambda: cluster.count(("EchoPong",)) >= 300, 60, cluster)
        time.sleep(1.5)  # a's refused commit, and anything it might wrongly write, has happened by now
        assert cluster.stop() == [0, 0]
    finally:
        del os.environ["ECHO_DELAY"]
    got = rs.pongs(store)
    assert all([p.n for p in got[f"s{i}"]] == [0, 1] for i in range(150))  # each ping once, in order
    assert "no longer holds segment(s)" in cluster.logs()  # a's stale commit was refused
    store.close()
