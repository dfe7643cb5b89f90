"""The example system on Kafka (tansu): same results as on SQLite, and kill -9 of a service is safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest

from choreo import open_store
from choreo.tansu import TansuBroker
from services import TARGETS, system
from services.checks import END_TYPES, check_invariants, read_facts
from services.demo import plan, run_demo

pytestmark = pytest.mark.slow


def test_the_demo_on_kafka_reaches_the_same_final_states_as_on_sqlite(
    kafka_broker: TansuBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    on_sqlite = run_demo(f"sqlite:///{tmp_path}/demo.db", orders=150, seed=11)
    on_kafka = run_demo(f"kafka://{kafka_broker.bootstrap}?session_timeout_ms=3000&heartbeat_interval_ms=1000",
                        orders=150, seed=11)
    assert on_kafka["invariants_ok"], on_kafka["invariants"]
    assert on_kafka["final_states"] == on_sqlite["final_states"]
    assert len(on_kafka["final_states"]) == 150 and set(on_kafka["states"]) == {"completed", "failed"}


REPO = Path(__file__).resolve().parents[2]


def spawn(target: str, url: str, cwd: Path) -> subprocess.Popen[bytes]:
    """`choreo run` in `cwd` (where its Kafka state goes), with the example's `services` importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "choreo", "run", target, "--store", url], cwd=cwd, env=env)


def test_kill_9_of_a_service_on_kafka_then_restart_ends_every_saga(kafka_broker: TansuBroker, tmp_path: Path) -> None:
    name = uuid4().hex[:8]
    url = (f"kafka://{kafka_broker.bootstrap}?topic=crash-{name}&state={tmp_path}/state"
           "&session_timeout_ms=3000&heartbeat_interval_ms=1000")
    store = open_store(url)
    planned = plan(300, seed=5)
    saga_ids = {s for s, *_ in planned}
    ended: set[str] = set()
    watch = store.feed("watch", dict, group=False)

    def count(timeout: float = 0.05) -> int:
        ended.update(e.saga_id for e in watch.poll(5000, timeout) if e.type in END_TYPES)
        return len(ended)

    procs = {n: spawn(target, url, tmp_path) for n, target in TARGETS.items()}
    try:
        for saga_id, order, _, _ in planned[:200]:
            system.start(store, order, saga_id=saga_id)
        deadline = time.monotonic() + 60
        while count() < 10 and time.monotonic() < deadline:
            pass
        os.kill(procs["payment"].pid, signal.SIGKILL)  # while the first wave is in flight
        procs["payment"].wait()
        for saga_id, order, _, _ in planned[200:]:  # the second wave needs payment
            system.start(store, order, saga_id=saga_id)
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            count()
        assert len(ended) < len(saga_ids), "every saga ended without payment; nothing was tested"
        procs["payment"] = spawn(TARGETS["payment"], url, tmp_path)
        deadline = time.monotonic() + 120
        while count(0.2) < len(saga_ids) and time.monotonic() < deadline:
            pass
    finally:
        watch.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs.values()]
    try:
        assert codes == [0] * len(codes)  # SIGTERM stops a service cleanly
        assert len(ended) == len(saga_ids)
        facts = read_facts(store, saga_ids)  # copies the relay sent twice are counted once
        invariants = check_invariants(store, facts)
        assert all(invariants.values()), invariants
        for saga_id, _, state, cause in planned:
            assert (facts[saga_id].state, facts[saga_id].cause) == (state, cause)
    finally:
        store.close()
