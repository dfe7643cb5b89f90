"""Each service in its own process on one SQLite file: same results, and kill -9 is safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from choreo import EventStore, open_store
from choreo.store import Interest
from services import TARGETS, system
from services.checks import check_invariants, read_facts
from services.demo import plan, run_demo

pytestmark = pytest.mark.slow


def test_processes_reach_the_same_final_states_as_in_process(tmp_path: Path) -> None:
    one = run_demo(f"sqlite:///{tmp_path}/one.db", orders=150, seed=11)
    many = run_demo(f"sqlite:///{tmp_path}/many.db", orders=150, seed=11, processes=True)
    assert one["invariants_ok"] and many["invariants_ok"], (one["invariants"], many["invariants"])
    assert one["final_states"] == many["final_states"]
    assert len(one["final_states"]) == 150 and set(one["states"]) == {"completed", "failed"}


def spawn(target: str, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "choreo", "run", target, "--store", url])


def ended(store: EventStore) -> int:
    """How many sagas the orders service ended (confirmed or cancelled) in the log."""
    return len(store.read(0, 100_000, interest=Interest(frozenset({"OrderConfirmed", "OrderCancelled"}))))  # type: ignore[attr-defined]


def test_kill_9_of_a_service_mid_run_then_restart_ends_every_saga(durable_url: str) -> None:
    """On SQLite and PostgreSQL: a service killed mid-run (perhaps mid-commit, holding the log's lock)
    holds nobody up, loses nothing and applies nothing twice; its restart resumes."""
    url = durable_url
    store = open_store(url)
    planned = plan(300, seed=5)
    saga_ids = {s for s, *_ in planned}
    procs = {name: spawn(target, url) for name, target in TARGETS.items()}
    try:
        for saga_id, order, _, _ in planned[:180]:
            system.start(store, order, saga_id=saga_id)
        deadline = time.monotonic() + 60
        while ended(store) < 10 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(procs["payment"].pid, signal.SIGKILL)  # while the first wave is in flight
        procs["payment"].wait()
        for saga_id, order, _, _ in planned[180:]:  # the second wave needs payment
            system.start(store, order, saga_id=saga_id)
        time.sleep(0.5)
        assert ended(store) < len(saga_ids), "every saga ended without payment; nothing was tested"
        procs["payment"] = spawn(TARGETS["payment"], url)
        deadline = time.monotonic() + 120
        while ended(store) < len(saga_ids) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(20) for p in procs.values()]
    assert codes == [0] * len(codes)  # SIGTERM stops a service cleanly
    facts = read_facts(store, saga_ids)
    invariants = check_invariants(store, facts)
    assert all(invariants.values()), invariants
    for saga_id, _, state, cause in planned:
        assert (facts[saga_id].state, facts[saga_id].cause) == (state, cause)
    store.close()
