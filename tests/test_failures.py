"""Guarantee 6 and the operator's tools: retries, dead letters held per saga, retry/skip/compensate, bad input."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from uuid import uuid4

import pytest

from choreo import Runner, SagaProjection, StepFailed, open_store
from choreo.cli import main
from choreo.operations import find_dead_letter, force_compensation, list_dead_letters, request_retry, request_skip
from services import TARGETS, shipping, system
from services.checks import check_invariants, read_facts
from services.contracts import OrderPlaced
from services.demo import plan

SERVICES = list(TARGETS)


def order(i: int, **changes: object) -> OrderPlaced:
    fields: dict[str, object] = dict(order_id=f"o-{i}", customer_id=f"customer-{i % 7}", sku="widget", quantity=1,
                                     amount=100, address="1 Main St")
    return OrderPlaced(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_thousand_bad_records_are_parked_and_every_good_saga_ends(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bad.db"
    store = open_store(url)
    planned = plan(300, seed=3)
    for saga_id, placed, _, _ in planned[:150]:
        system.start(store, placed, saga_id=saga_id)
    rng = random.Random(1)
    kinds = ["garbage", "unknown", "invalid", "no saga"]
    bad: dict[str, str] = {}
    conn = sqlite3.connect(tmp_path / "bad.db")  # straight into the log, as a foreign writer would
    for i in range(1000):
        kind, event_id = kinds[i % 4], f"bad-{i}"
        bad[event_id] = kind
        type_, saga, payload = {
            "garbage": ("OrderPlaced", f"b-{i}", bytes(rng.randrange(256) for _ in range(20))),
            "unknown": (f"FromTheFuture{i % 3}", f"b-{i}", b"{}"),
            "invalid": ("OrderPlaced", f"b-{i}", b'{"order_id": 5}'),
            "no saga": ("OrderPlaced", None, order(10_000 + i).model_dump_json().encode()),
        }[kind]
        conn.execute(
            "INSERT INTO choreo_log (event_id, type, version, saga_id, causation_id, service, step, outcome, "
            "occurred_at, payload) VALUES (?, ?, 1, ?, NULL, 'intruder', NULL, NULL, '2026-01-01T00:00:00+00:00', ?)",
            (event_id, type_, saga, payload if kind == "garbage" else payload.decode()),
        )
    conn.commit()
    conn.close()
    for saga_id, placed, _, _ in planned[150:]:
        system.start(store, placed, saga_id=saga_id)
    Runner(system, store).run_until_idle()

    facts = read_facts(store, {s for s, *_ in planned})
    for saga_id, _, state, cause in planned:
        assert (facts[saga_id].state, facts[saga_id].cause) == (state, cause)
    assert all(check_invariants(store, facts).values())
    letters = list_dead_letters(store, SERVICES)
    reasons = {d.event_id: d.reason for d in letters}
    assert set(reasons) == set(bad)  # every bad record, and nothing else, is parked
    expected = {"garbage": "payload is a BLOB", "unknown": "unknown event type", "invalid": "OrderPlaced.order_id",
                "no saga": "missing saga id"}
    for event_id, kind in bad.items():
        assert expected[kind] in reasons[event_id], (kind, reasons[event_id])
    unknown = [d for d in letters if bad[d.event_id] == "unknown"]
    assert {d.service for d in unknown} == set(SERVICES)  # a type nobody here knows: every service keeps it
    store.close()


@pytest.fixture
def broken_shipping(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Shipping's step fails for order o-0 until `state["fixed"]` is set."""
    state = {"fixed": False}
    real = shipping.service.steps["create_shipment"].fn

    def create(event, ctx):  # type: ignore[no-untyped-def]
        if event.order_id == "o-0" and not state["fixed"]:
            raise ConnectionError("carrier API is down")
        return real(event, ctx)

    replace_step(monkeypatch, create)
    return state


def replace_step(monkeypatch: pytest.MonkeyPatch, fn) -> None:  # type: ignore[no-untyped-def]
    """Run `fn` instead of shipping's create_shipment step for this test."""
    handler = shipping.service.steps["create_shipment"]
    patched = handler.__class__(handler.kind, fn, handler.event_type, handler.step, handler.retry)
    monkeypatch.setitem(shipping.service.steps, "create_shipment", patched)
    monkeypatch.setitem(shipping.service.handlers, handler.event_type.event_type, [patched])  # type: ignore[union-attr]


def test_a_parked_event_waits_while_other_sagas_complete_then_retry_completes_it(
    durable_url: str, broken_shipping: dict[str, bool]
) -> None:
    store = open_store(durable_url)
    runner = Runner(system, store)
    stuck = runner.start(order(0))
    others = [runner.start(order(i)) for i in range(1, 6)]
    runner.run_until_idle()
    (letter,) = list_dead_letters(store, SERVICES)
    assert (letter.service, letter.saga_id, letter.type) == ("shipping", stuck, "PaymentCaptured")
    assert letter.attempts == 3 and "ConnectionError: carrier API is down" in letter.reason
    projection = SagaProjection(store, sagas=system.sagas)
    projection.update()
    assert all(projection.get(s)["state"] == "completed" for s in others)  # type: ignore[index]
    saga = projection.get(stuck)
    assert saga is not None and saga["state"] == "running" and saga["parked"] == 1
    assert saga["steps"]["create_shipment"]["attempts"] == 3

    broken_shipping["fixed"] = True
    request_retry(store, letter, "carrier is back")
    runner.run_until_idle()
    projection.update()
    saga = projection.get(stuck)
    assert saga is not None and saga["state"] == "completed" and saga["parked"] == 0
    types = [e["type"] for e in saga["timeline"]]
    assert types.index("choreo.RetryRequested") < types.index("ShipmentCreated")
    assert "choreo.DeadLetterResolved" in types  # committed together with ShipmentCreated
    assert types[-1] == "OrderConfirmed"
    assert find_dead_letter(store, f"shipping:{letter.id}").status == "retried"
    assert all(check_invariants(store, read_facts(store)).values())
    store.close()


def test_compensate_goes_ahead_of_a_parked_trigger_and_skips_it(
    durable_url: str, broken_shipping: dict[str, bool]
) -> None:
    store = open_store(durable_url)
    runner = Runner(system, store)
    stuck = runner.start(order(0))
    runner.run_until_idle()
    (letter,) = list_dead_letters(store, SERVICES)
    force_compensation(store, stuck, "customer called to cancel")
    runner.run_until_idle()
    # the forced failure was not held behind the parked trigger: the trigger's step is skipped
    assert list_dead_letters(store, SERVICES) == []
    (skipped,) = list_dead_letters(store, ["shipping"], status="skipped")
    assert skipped.id == letter.id and "saga failed (choreo.CompensationForced" in skipped.reason
    projection = SagaProjection(store, sagas=system.sagas)
    projection.update()
    saga = projection.get(stuck)
    assert saga is not None and saga["state"] == "failed"
    assert "forced by operator" in (saga["cause"] or "") or "customer called to cancel" in (saga["cause"] or "")
    assert {n: s["status"] for n, s in saga["steps"].items() if s["status"] != "pending"} == {
        "reserve_inventory": "compensated", "process_payment": "compensated", "create_shipment": "skipped"}
    assert any(e["type"] == "choreo.DeadLetterResolved" for e in saga["timeline"])
    facts = read_facts(store)
    assert facts[stuck].state == "failed" and "customer called to cancel" in (facts[stuck].cause or "")
    assert all(check_invariants(store, facts).values())
    # an operator's later skip of the resolved letter changes nothing
    request_skip(store, letter, "cancelled by the customer; nothing to ship")
    runner.run_until_idle()
    assert read_facts(store)[stuck].state == "failed"
    store.close()


def test_a_business_failure_compensates_and_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def reject(event, ctx):  # type: ignore[no-untyped-def]
        calls.append(event.order_id)
        raise StepFailed(shipping.ShipmentRejected(order_id=event.order_id, address=event.address, reason="no road"))

    replace_step(monkeypatch, reject)
    store = open_store(f"sqlite:///{tmp_path}/b.db")
    runner = Runner(system, store)
    runner.start(order(1))
    runner.run_until_idle()
    assert calls == ["o-1"] and list_dead_letters(store, SERVICES) == []
    assert read_facts(store).popitem()[1].state == "failed"
    store.close()


def test_the_dlq_commands(durable_url: str, broken_shipping: dict[str, bool],
                          capsys: pytest.CaptureFixture[str]) -> None:
    url = durable_url
    store = open_store(url)
    runner = Runner(system, store)
    stuck = runner.start(order(0))
    runner.run_until_idle()
    assert main(["dlq", "list", "--store", url, "--system", "services:system"]) == 0
    out = capsys.readouterr().out
    assert "shipping:1" in out and stuck in out and "1 dead letter(s)" in out
    assert main(["dlq", "show", "shipping:1", "--store", url]) == 0
    assert "carrier API is down" in capsys.readouterr().out
    assert main(["dlq", "show", "shipping:99", "--store", url]) == 1
    assert "no dead letter 'shipping:99'" in capsys.readouterr().err
    broken_shipping["fixed"] = True
    assert main(["dlq", "retry", "--all", "--store", url, "--system", "services:system", "--reason", "fixed"]) == 0
    runner.run_until_idle()
    assert main(["dlq", "list", "--store", url, "--service", "shipping", "--status", "retried", "--json"]) == 0
    assert '"status": "retried"' in capsys.readouterr().out
    assert read_facts(store)[stuck].state == "completed"
    store.close()


def test_operator_retry_on_kafka(kafka_url: str, broken_shipping: dict[str, bool]) -> None:
    import time

    store = open_store(kafka_url)
    runner = Runner(system, store)
    runner.start_threads()
    try:
        stuck = runner.start(order(0), saga_id=str(uuid4()))
        deadline = time.monotonic() + 60
        while not list_dead_letters(store, ["shipping"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        (letter,) = list_dead_letters(store, ["shipping"])
        broken_shipping["fixed"] = True
        request_retry(store, letter)
        while read_facts(store).get(stuck, None) is None or read_facts(store)[stuck].state != "completed":
            assert time.monotonic() < deadline, "the retried saga did not complete"
    finally:
        runner.stop()
    assert find_dead_letter(store, f"shipping:{letter.id}").status == "retried"
    store.close()
