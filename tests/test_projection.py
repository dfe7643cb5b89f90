"""Guarantee 5: the saga projection comes from the stream alone, and replay equals incremental."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from freezegun import freeze_time

import services
from choreo import Envelope, EventStore, InMemoryStore, SagaFilter, SagaProjection
from choreo._saga_fold import DOCUMENTS
from choreo.projection import dumps, stored_timeline
from choreo.store import DocumentStore
from choreo.testing import TestSystem
from services.contracts import OrderPlaced
from services.demo import plan

ROOT = Path(__file__).parent.parent  # the example system (`services`) is imported from the checkout


class ListLog(InMemoryStore):
    """A log that may deliver the same event twice, as a Kafka relay may."""

    def __init__(self, envelopes: list[Envelope]) -> None:
        super().__init__()
        self._log = [e.at(i + 1) for i, e in enumerate(envelopes)]


def finished_system(orders: int, seed: int) -> TestSystem:
    harness = TestSystem(services.system)
    for saga_id, order, _, _ in plan(orders, seed):
        harness.start(order, saga_id=saga_id)
    harness.run()
    return harness


def interleave(log: list[Envelope], rng: random.Random, dup_rate: float) -> list[Envelope]:
    """A random interleaving that keeps each saga's order, with some events delivered twice."""
    queues: dict[str, list[Envelope]] = {}
    for e in log:
        queues.setdefault(e.saga_id, []).append(e)
    out: list[Envelope] = []
    while queues:
        saga = rng.choice(sorted(queues))
        e = queues[saga].pop(0)
        out.append(e)
        if rng.random() < dup_rate:
            queues[saga].insert(rng.randrange(len(queues[saga]) + 1), e)  # a later redelivery
        if not queues[saga]:
            del queues[saga]
    return out


def snapshot(documents: DocumentStore) -> list[str]:
    """Every saga document with its timeline, canonically."""
    return sorted(dumps({**d, "timeline": stored_timeline(documents, d["saga_id"], d)}) for d in documents.scan())


@pytest.mark.parametrize("seed", range(12))
def test_random_interleavings_and_duplicates_match_replay_and_what_services_did(seed: int) -> None:
    harness = finished_system(12, seed)
    truth = {e.saga_id: {"OrderConfirmed": "completed", "OrderCancelled": "failed"}[e.type]
             for e in harness.envelopes() if e.type in ("OrderConfirmed", "OrderCancelled")}
    rng = random.Random(seed)
    shuffled = interleave(harness.envelopes(), rng, dup_rate=0.2)
    store = ListLog([])
    projection = SagaProjection(store, sagas=services.system.sagas, batch_size=rng.randint(1, 7))
    for e in shuffled:  # the log grows, the projection catches up in between
        store._log.append(e.at(len(store._log) + 1))
        if rng.random() < 0.3:
            projection.update()
    projection.update()
    incremental = snapshot(projection.documents)
    projection.replay()
    assert snapshot(projection.documents) == incremental
    assert {s["saga_id"]: s["state"] for s in projection.list()} == truth
    for saga_id in truth:  # each event once in the timeline, however often it was delivered
        timeline = [e["event_id"] for e in projection.get(saga_id)["timeline"]]  # type: ignore[index]
        assert timeline == [e.event_id for e in harness.envelopes(saga_id)]


def test_a_failed_saga_shows_the_failing_step_its_cause_and_compensations() -> None:
    harness = TestSystem(services.system)
    saga_id = harness.start(OrderPlaced(order_id="o", customer_id="c", sku="widget", quantity=1,
                                        amount=100, address="nowhere"))
    harness.run()
    projection = SagaProjection(harness.store, sagas=services.system.sagas)
    projection.update()
    saga = projection.get(saga_id)
    assert saga is not None and saga["state"] == "failed"
    assert saga["cause"] == "create_shipment: ShipmentRejected: address undeliverable"
    steps = saga["steps"]
    assert steps["create_shipment"]["status"] == "failed"
    assert steps["reserve_inventory"]["status"] == "compensated"
    assert steps["process_payment"]["status"] == "compensated"
    assert steps["send_confirmation"]["status"] == "pending"
    types = {e["event_id"]: e["type"] for e in saga["timeline"]}
    assert [types[i] for i in steps["process_payment"]["events"]] == ["PaymentCaptured", "PaymentRefunded"]
    as_of = projection.get(saga_id, as_of=saga["timeline"][2]["position"])
    assert as_of is not None and as_of["state"] == "running"


def test_unknown_and_undecodable_events_are_recorded_and_counted() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    base = dict(version=1, saga_id="s", causation_id=None, service="x", step=None, outcome=None, occurred_at=t0)
    store = InMemoryStore()
    store.append([
        Envelope(event_id="1", type="FromTheFuture", payload="{}", **base),  # type: ignore[arg-type]
        Envelope(event_id="2", type="OrderPlaced", payload="garbage", **base),  # type: ignore[arg-type]
    ])
    projection = SagaProjection(store)
    assert projection.update() == 2
    saga = projection.get("s")
    assert saga is not None and saga["unknown_events"] == 1  # only the one that cannot be read
    assert "payload is not a JSON object" in saga["timeline"][1]["unknown"]
    # a type this process does not know is folded like any other, and marked only when shown
    assert saga["saga_type"] == "FromTheFuture" and "FromTheFuture" in saga["timeline"][0]["unknown"]
    assert "unknown" not in projection.timeline("s")[0][-1]


def test_stuck_sagas_are_found_against_the_clock() -> None:
    with freeze_time("2030-01-01 00:00:00"):
        harness = TestSystem(services.system)
        harness.start(OrderPlaced(order_id="o", customer_id="c", sku="widget", quantity=1, amount=1, address="x"))
        projection = SagaProjection(harness.store, sagas=services.system.sagas, stuck_after=timedelta(minutes=5))
        projection.update()  # only OrderPlaced: nobody processed it
        assert projection.counts() == {"started": 1}
    with freeze_time("2030-01-01 00:06:00"):
        assert projection.counts() == {"stuck": 1}
        assert len(projection.list(SagaFilter(stuck_for=timedelta(minutes=5)))) == 1
        assert projection.list(SagaFilter(stuck_for=timedelta(minutes=10))) == []


def test_the_projection_resumes_and_never_double_counts(durable_store: EventStore) -> None:
    from choreo import Runner

    runner = Runner(services.system, durable_store)
    for saga_id, order, _, _ in plan(20, 3):
        runner.start(order, saga_id=saga_id)
    first = SagaProjection(durable_store, sagas=services.system.sagas)
    first.update()
    runner.run_until_idle()
    again = SagaProjection(durable_store, sagas=services.system.sagas)  # a restart
    again.update()
    assert sum(again.counts().values()) == 20
    built = snapshot(again.documents)
    again.replay()
    assert snapshot(again.documents) == built


@pytest.mark.slow
def test_cli_list_agrees_with_the_demo_and_replay_changes_nothing(tmp_path: Path) -> None:
    def choreo(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "choreo", *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    url = f"sqlite:///{tmp_path}/demo.db"
    system = ("--system", "services:system")
    demo = json.loads(choreo("demo", "--orders", "120", "--json", "--per-saga", "--store", url))
    listed = choreo("sagas", "list", "--json", "--store", url, *system)
    assert {s["saga_id"]: s["state"] for s in json.loads(listed)} == demo["final_states"]
    choreo("replay", "--store", url, *system)
    assert choreo("sagas", "list", "--json", "--store", url, *system) == listed
    failed = next(s for s in json.loads(listed) if s["cause"] and "undeliverable" in s["cause"])
    shown = choreo("sagas", "show", failed["saga_id"], "--store", url, *system)
    assert "create_shipment" in shown and "failed" in shown and "PaymentRefunded" in shown
    assert "sequenceDiagram" in choreo("sagas", "show", failed["saga_id"], "--mermaid", "--store", url, *system)
    missing = subprocess.run([sys.executable, "-m", "choreo", "sagas", "show", "nope", "--store", url, *system],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


@pytest.mark.slow
def test_project_runs_in_its_own_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    from choreo import open_store

    url = f"sqlite:///{tmp_path}/p.db"
    harness_store = open_store(url)
    from choreo import Runner

    runner = Runner(services.system, harness_store)
    for saga_id, order, _, _ in plan(30, 2):
        runner.start(order, saga_id=saga_id)
    runner.run_until_idle()
    proc = subprocess.Popen([sys.executable, "-m", "choreo", "project", "--store", url, "--system", "services:system"],
                            cwd=ROOT)
    documents = harness_store.documents(DOCUMENTS)
    deadline = time.monotonic() + 60
    while documents.position() < harness_store.last_position() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert documents.position() == harness_store.last_position()
    assert sum(1 for _ in documents.scan()) == 30
    harness_store.close()
