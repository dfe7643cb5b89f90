"""Replicas of a service on Kafka (a real broker: tansu): one consumer group, partitions claimed in the
shared state store, stale commits refused, each event published once, offsets visible to ops tools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote
from uuid import uuid4

import pytest
from kafka import KafkaAdminClient

from choreo import Context, Event, PartitionLost, Processor, RetryPolicy, Service, open_store
from choreo.stores._kafka_owner import OWNER
from choreo.stores.kafka import KafkaStore
from choreo.tansu import TansuBroker
from services import TARGETS, system
from services.checks import check_invariants, read_facts
from services.demo import plan
from tests.test_kafka_faults import FaultPing, FaultPong, echo, envelope

REPO = Path(__file__).resolve().parent.parent


def group_url(broker: TansuBroker, state: str, partitions: int = 4) -> str:
    name = uuid4().hex[:12]
    return (f"kafka://{broker.bootstrap}?topic=t-{name}&group_prefix=g-{name}.&partitions={partitions}"
            f"&state={state}&session_timeout_ms=3000&heartbeat_interval_ms=1000")


def kafka(url: str) -> KafkaStore:
    store = open_store(url)
    assert isinstance(store, KafkaStore)
    return store


def until(condition: Callable[[], bool], timeout: float = 60.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def marks(store: KafkaStore, service: str) -> dict[str, int]:
    """The owner marks of a service's partitions: `owner:TOPIC:P` -> generation << 32 | commits."""
    raw = store.service(service).inner.tracking()  # type: ignore[attr-defined]
    return {k: v for k, v in raw.items() if k.startswith(OWNER)}


def test_a_replica_that_lost_its_partition_cannot_commit_and_nothing_is_written(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    url = group_url(kafka_broker, str(tmp_path / "state"))
    first, second = kafka(url), kafka(url)  # two replicas of echo on one state folder
    a, b = first.service("echo"), second.service("echo")
    topic = first.topic
    a.claim([0, 1])  # type: ignore[attr-defined]
    a.commit(events=[], emitted=[], tracking={f"{topic}:1": 3})
    b.claim([1])  # type: ignore[attr-defined]  # the group moved partition 1 while `a` was not looking
    pong = envelope(FaultPing(n=1), "s-1")
    with pytest.raises(PartitionLost, match=r"another replica now owns partition\(s\) 1 \(claimed at generation 2; "
                                            r"this replica held 1\).*refused and nothing was written"):
        a.commit(events=[], emitted=[pong], tracking={f"{topic}:1": 7}, handled=[pong.event_id])
    assert b.tracking() == {f"{topic}:1": 3}  # not moved
    assert b.seen([pong.event_id]) == set() and b.pending() == 0  # type: ignore[attr-defined]  # no outbox row
    with pytest.raises(PartitionLost, match=r"does not own partition\(s\) \[1\]"):  # refused before writing now
        a.commit(events=[], emitted=[], tracking={f"{topic}:1": 8})
    a.commit(events=[], emitted=[], tracking={f"{topic}:0": 5})  # the partition it still owns
    b.commit(events=[], emitted=[], tracking={f"{topic}:1": 9})
    assert b.tracking() == {f"{topic}:0": 5, f"{topic}:1": 9}
    first.close()
    second.close()


def test_a_processor_that_lost_its_partitions_stops_committing_for_them(kafka_url: str) -> None:
    stale, other = kafka(kafka_url), kafka(kafka_url)
    proc = Processor(echo, stale)
    stale.append([envelope(FaultPing(n=1), "s-1")])
    deadline = time.monotonic() + 30
    while len(proc.own.tracking()) < 1:
        assert time.monotonic() < deadline
        proc.poll(0.2)
    before = proc.own.tracking()
    # another replica claims every partition (as if the group moved them while this one was stalled)
    other.service("echo").claim(range(stale.partition_count()))  # type: ignore[attr-defined]
    stale.append([envelope(FaultPing(n=2), "s-1")])
    for _ in range(10):
        proc.poll(0.2)  # reads the ping, handles it, and is refused
    assert proc.own.tracking() == before
    pongs = [e for batch in stale.scan() for e in batch if e.type == "FaultPong"]
    assert len(pongs) == 1
    proc.close()
    stale.close()
    other.close()


def test_a_replica_busy_between_its_polls_still_joins_its_group(kafka_url: str) -> None:
    # kafka-python finishes a join in the background and throws it away if it completed between two polls
    # (it sends a new one): the feed's poll waits for the join instead of returning while it is under way
    store = kafka(kafka_url)
    own = store.service("echo")
    feed = store.feed("echo", own.tracking)
    started = time.monotonic()
    try:
        while True:
            feed.poll(100, 0.2)
            if own.owner.owned:  # type: ignore[attr-defined]
                break
            assert time.monotonic() - started < 30, "never joined: each join completed between two polls"
            time.sleep(3)  # a long batch, or a loaded machine: longer than the broker takes for a join
        assert set(own.owner.owned) == set(range(store.partition_count()))  # type: ignore[attr-defined]
    finally:
        feed.close()
        store.close()


holder = Service("holder")


@holder.on(FaultPing)
def pong_unless_zero(ping: FaultPing, ctx: Context) -> Event:
    if ping.n == 0:
        raise ValueError("ping 0 cannot be answered")
    return FaultPong(n=ping.n)


def test_a_replica_given_a_partition_holds_the_sagas_another_replica_parked(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    url = group_url(kafka_broker, str(tmp_path / "state"), partitions=1)
    first, second = kafka(url), kafka(url)
    park = RetryPolicy(retry_on=())
    a, b = Processor(holder, first, retry=park), Processor(holder, second, retry=park)  # b read its state now
    first.append([envelope(FaultPing(n=0), "s-1")])
    until(lambda: a.poll(0.1) >= 0 and len(a.own.dead_letters()) == 1, timeout=30, step=0)
    a.close()  # leaves the group: the partition moves to b
    first.append([envelope(FaultPing(n=1), "s-1"), envelope(FaultPing(n=2), "s-2")])
    position = f"{second.topic}:0"
    until(lambda: b.poll(0.2) >= 0 and b.own.tracking().get(position, 0) >= 4, timeout=30, step=0)  # read all
    pongs = [e.saga_id for x in second.scan() for e in x if e.type == "FaultPong"]
    assert pongs == ["s-2"]  # s-1's second ping waits behind the letter a parked: the saga keeps its order
    assert [d.saga_id for d in b.own.dead_letters()] == ["s-1", "s-1"]
    b.close()
    first.close()
    second.close()


def test_replicas_split_the_partitions_publish_each_event_once_and_show_their_offsets(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    url = group_url(kafka_broker, str(tmp_path / "state"))
    stores = [kafka(url) for _ in range(3)]
    procs = [Processor(echo, s) for s in stores]
    handled = [0] * len(procs)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            while not stop.is_set():
                handled[i] += procs[i].poll(0.1)
        except BaseException as e:  # pragma: no cover - shown by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(procs))]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        owned = lambda: [set(p.own.owner.owned) for p in procs]  # type: ignore[attr-defined]  # noqa: E731
        until(lambda: all(owned()) and set().union(*owned()) == set(range(4)))
        joined = time.monotonic() - started
        pings = [envelope(FaultPing(n=i), f"s-{i}") for i in range(60)]
        stores[0].append(pings)
        until(lambda: sum(1 for b in stores[0].scan() for e in b if e.type == "FaultPong") >= len(pings))
        assert not errors, errors
        assert sum(1 for n in handled if n) >= 2  # the work was split
        mine = owned()
        assert all(not (x & y) for i, x in enumerate(mine) for y in mine[i + 1:])  # no partition owned twice
        # every event once in the topic: the relay of each partition's owner published it, no one else
        published = Counter(e.event_id for b in stores[0].scan() for e in b)
        assert published and max(published.values()) == 1
        pongs = [e for b in stores[0].scan() for e in b if e.type == "FaultPong"]
        assert sorted(str(e.causation_id) for e in pongs) == sorted(p.event_id for p in pings)
        # the offsets committed to Kafka (advisory) are the local tracking: what lag exporters read
        tracking = stores[0].service("echo").tracking()
        admin = KafkaAdminClient(bootstrap_servers=stores[0].settings.servers)
        try:
            def offsets() -> dict[str, int]:
                group = f"{stores[0].settings.group_prefix}echo"
                got = admin.list_group_offsets(group)[group]
                return {f"{tp.topic}:{tp.partition}": o.offset for tp, o in got.items() if o.offset >= 0}

            until(lambda: offsets() == tracking, timeout=20, step=0.2)
        finally:
            admin.close()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for p in procs:
            p.close()
        for s in stores:
            s.close()
    print(f"\n3 replicas: partitions split {[sorted(m) for m in mine]} {joined:.1f}s after they started")


# -- processes: the example with replicas, one of each killed with SIGKILL ------------------------------------

def spawn(name: str, url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "choreo", "run", TARGETS[name], "--store", url, "--log-level", "WARNING"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )


def state_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where the services keep their state: one SQLite file, or a PostgreSQL database (replicas across hosts)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return str(request.getfixturevalue("postgres_url"))  # skips where PostgreSQL cannot be started


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replicas_of_payment_and_inventory_survive_a_kill_9_and_every_saga_ends_as_planned(
    kafka_broker: TansuBroker, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    # the services' state in one store named by URL (state=sqlite:///FILE or state=postgresql://...)
    url = group_url(kafka_broker, quote(state_url(backend, tmp_path, request), safe=""), partitions=6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "CHOREO_FULFILMENT_DEADLINE_S": "300"}
    store = kafka(url)
    replicas = {"orders": 1, "shipping": 1, "notification": 1, "payment": 3, "inventory": 3}
    procs = {(name, i): spawn(name, url, env, tmp_path / f"{name}-{i}.log")
             for name, count in replicas.items() for i in range(count)}
    planned = plan(int(os.environ.get("CHOREO_TEST_SAGAS", "1000")), seed=13)  # the 1,000 in flight
    saga_ids = {s for s, *_ in planned}
    ends: Counter[str] = Counter()
    watch = store.feed(f"watch-{uuid4()}", dict, group=False)

    def ended() -> int:
        for e in watch.poll(5000, 0.2):
            if e.type in ("OrderConfirmed", "OrderCancelled"):
                ends[e.event_id + " " + e.saga_id] += 1
        return len({key.split()[1] for key in ends})

    try:
        until(lambda: all(len(marks(store, name)) == 6 for name in ("payment", "inventory")), timeout=60)
        for i in range(0, len(planned), 50):
            system.start_many(store, [(o, s) for s, o, _, _ in planned[i : i + 50]])
        until(lambda: ended() >= len(planned) // 5, timeout=120)
        before = {name: marks(store, name) for name in ("payment", "inventory")}
        killed = time.monotonic()
        for victim in (("payment", 0), ("inventory", 0)):
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
        at_kill = ended()

        def moved(name: str) -> bool:  # every partition claimed again (the group reassigned them all)
            now = marks(store, name)
            return all(now[k] >> 32 > v >> 32 for k, v in before[name].items())

        until(lambda: moved("payment") and moved("inventory"), timeout=60)
        failover = time.monotonic() - killed
        until(lambda: ended() >= len(saga_ids), timeout=180, step=0.2)
        finished = time.monotonic() - killed
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        watch.close()
    facts = read_facts(store, saga_ids)
    wrong = {s: (facts[s].state if s in facts else "lost", state) for s, _, state, _ in planned
             if s not in facts or facts[s].state != state}
    assert wrong == {}, list(wrong.items())[:5]
    assert max(Counter(key.split()[1] for key in ends).values()) == 1  # one end per saga, never two
    invariants = check_invariants(store, facts)
    assert all(invariants.values()), invariants
    published = Counter((e.event_id, e.service) for b in store.scan() for e in b)
    copies = Counter(service for (_, service), n in published.items() for _ in range(n - 1))
    # a copy (same id, skipped by every consumer) only of what a killed replica published before marking it
    assert set(copies) <= {"payment", "inventory"}, copies
    store.close()
    print(f"\n{backend}: kill -9 of a payment and an inventory replica with {at_kill}/{len(planned)} sagas ended: "
          f"partitions claimed again after {failover:.1f}s, every saga ended {finished:.1f}s after the kill; "
          f"copies in the topic: {dict(copies)}")
