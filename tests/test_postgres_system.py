"""The example system end to end on PostgreSQL: a `choreo run` process per service (`choreo demo --processes`)."""

from __future__ import annotations

import json
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
from services.demo import plan

ROOT = Path(__file__).resolve().parent.parent


def choreo(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "choreo", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_demo_with_a_process_per_service_ends_every_saga_with_the_invariants_holding(postgres_url: str) -> None:
    summary = json.loads(choreo("demo", "--processes", "--orders", "150", "--json", "--per-saga",
                                "--store", postgres_url))
    assert summary["mode"] == "processes" and summary["ended"] == summary["sagas"] == 150
    assert summary["invariants_ok"], summary["invariants"]
    assert summary["parked_events"] == 0
    listed = json.loads(choreo("sagas", "list", "--json", "--store", postgres_url, "--system", "services:system"))
    assert {s["saga_id"]: s["state"] for s in listed} == summary["final_states"]


@pytest.mark.slow
def test_kill_9_of_a_service_mid_commit_then_restart_ends_every_saga_once(postgres_url: str) -> None:
    """A service killed while it commits (its transaction may hold the log's lock) holds nobody up, loses
    nothing and applies nothing twice: the server rolls back what it left, and its restart resumes."""
    store = open_store(postgres_url)
    planned = plan(200, seed=5)
    saga_ids = {s for s, *_ in planned}
    procs = {name: spawn(target, postgres_url) for name, target in TARGETS.items()}
    try:
        for saga_id, order, _, _ in planned[:130]:
            system.start(store, order, saga_id=saga_id)
        deadline = time.monotonic() + 60
        while ended(store) < 10 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(procs["payment"].pid, signal.SIGKILL)  # while the first wave is in flight
        procs["payment"].wait()
        for saga_id, order, _, _ in planned[130:]:  # the second wave needs payment
            system.start(store, order, saga_id=saga_id)
        time.sleep(0.5)
        assert ended(store) < len(saga_ids), "every saga ended without payment; nothing was tested"
        procs["payment"] = spawn(TARGETS["payment"], postgres_url)
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


def spawn(target: str, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "choreo", "run", target, "--store", url, "--log-level", "ERROR"],
                            cwd=ROOT)


def ended(store: EventStore) -> int:
    return len(store.read(0, 100_000, interest=Interest(frozenset({"OrderConfirmed", "OrderCancelled"}))))  # type: ignore[attr-defined]
