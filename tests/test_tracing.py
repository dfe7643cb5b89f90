"""OpenTelemetry traces: a span per handler run, one trace per saga, across `choreo run` processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from datetime import datetime, timedelta, timezone

from choreo import Envelope, InMemoryStore, ManualClock, Processor, Runner, open_store, tracing, use_clock
from choreo.stores._kafka_records import decode_record, encode_record
from services import system
from services.demo import plan
from services.orders import FULFILMENT_DEADLINE
from tests.service_processes import env_with, running, wait_for
from tests.trace_export import span_record


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider for the test (set without touching other tests: restored after)."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exported
    provider.shutdown()


def completing_order() -> tuple[str, Any]:
    saga_id, order, state, _ = next(p for p in plan(20, 7) if p[2] == "completed" and "flaky" not in p[1].customer_id)
    return saga_id, order


def assert_one_trace_along_the_causation(spans: list[dict[str, Any]], log: list[Envelope], root: dict[str, Any]) -> None:
    """Every span is in the root's trace, and each handler span's parent is the span that emitted its event."""
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}, "one saga, one trace"
    by_id = {s["span_id"]: s for s in spans}
    events = {e.event_id: e for e in log}
    processed = [s for s in spans if s["name"].endswith(" process")]
    services = {s["attributes"]["choreo.service"] for s in processed}
    assert services == {"orders", "inventory", "payment", "shipping", "notification"}
    for span in processed:
        env = events[span["attributes"]["choreo.event_id"]]
        assert env.trace is not None
        parent_id = env.trace.split("-")[2]
        assert span["parent_id"] == parent_id, (span["name"], span["attributes"])
        parent = by_id[parent_id]
        if env.causation_id is None:  # the start event: its span is the `start` span, a child of the user's
            assert parent["name"] == "OrderPlaced start" and parent["parent_id"] == root["span_id"]
        elif env.type.startswith("choreo."):  # choreo's own (the saga's end): its cause's context
            assert env.trace == events[env.causation_id].trace
        else:  # the span of the service that emitted it, which handled its cause
            assert parent["attributes"]["choreo.service"] == env.service
            assert parent["attributes"]["choreo.event_id"] == env.causation_id
        assert span["attributes"]["choreo.saga_id"] == env.saga_id
        assert span["attributes"]["choreo.attempt"] == 1
    assert any(s["name"] == "choreo.SagaCompleted process" and s["attributes"]["choreo.service"] == "orders"
               for s in processed), "the end handler's span"
    steps = {s["attributes"].get("choreo.step"): s["attributes"]["choreo.outcome"] for s in processed}
    assert steps == {None: "handled", "reserve_inventory": "completed", "process_payment": "completed",
                     "create_shipment": "completed", "send_confirmation": "completed"}


def test_one_saga_is_one_trace_in_process(exporter: InMemorySpanExporter) -> None:
    store = InMemoryStore()
    saga_id, order = completing_order()
    with trace.get_tracer("shop").start_as_current_span("checkout"):
        system.start(store, order, saga_id=saga_id)
    Runner(system, store).run_until_idle()
    spans = [span_record(s) for s in exporter.get_finished_spans()]
    root = next(s for s in spans if s["name"] == "checkout")
    log = [e for batch in store.scan() for e in batch]
    assert_one_trace_along_the_causation(spans, log, root)


def test_a_deadline_fires_in_a_trace_of_its_own(exporter: InMemorySpanExporter) -> None:
    store = InMemoryStore()
    saga_id, order = completing_order()
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    previous = use_clock(clock)
    try:
        system.start(store, order, saga_id=saga_id)
        orders = Processor(system["orders"], store)
        orders.run_until_idle()
        clock.advance(timedelta(seconds=FULFILMENT_DEADLINE.total_seconds() + 1))
        orders.run_until_idle()
        orders.close()
        Runner(system, store).run_until_idle()  # inventory reserves, then compensates; orders ends the saga
    finally:
        use_clock(previous)
    spans = [span_record(s) for s in exporter.get_finished_spans()]
    fire = next(s for s in spans if s["name"] == "deadline fulfilment fire")
    assert fire["parent_id"] is None and fire["attributes"]["choreo.saga_id"] == saga_id
    timed_out = next(e for batch in store.scan() for e in batch if e.type == "OrderTimedOut")
    assert timed_out.trace is not None and timed_out.trace.split("-")[1:3] == [fire["trace_id"], fire["span_id"]]
    spans = [span_record(s) for s in exporter.get_finished_spans()]
    released = next(s for s in spans if s["attributes"].get("choreo.outcome") == "compensated")
    assert released["trace_id"] == fire["trace_id"] and released["attributes"]["choreo.service"] == "inventory"
    assert any(s["name"] == "choreo.SagaFailed process" for s in spans)  # the end handler has its span too


def test_no_tracer_provider_no_trace_context() -> None:
    store = InMemoryStore()
    saga_id, order = completing_order()
    system.start(store, order, saga_id=saga_id)
    Runner(system, store).run_until_idle()
    assert all(e.trace is None for batch in store.scan() for e in batch)
    assert not tracing.enabled()


def test_a_failing_handler_span_says_error_and_a_retry_its_attempt(exporter: InMemorySpanExporter) -> None:
    store = InMemoryStore()
    saga_id, order = completing_order()
    flaky = order.model_copy(update={"customer_id": "flaky-1"})  # the payment provider times out once
    system.start(store, flaky, saga_id=saga_id)
    Runner(system, store).run_until_idle()
    payment = [s for s in map(span_record, exporter.get_finished_spans())
               if s["attributes"].get("choreo.service") == "payment"]
    assert [(s["attributes"]["choreo.attempt"], s["attributes"]["choreo.outcome"]) for s in payment] == [
        (1, "error"), (2, "completed")]


def test_the_trace_context_survives_the_kafka_record_and_sqlite(tmp_path: Path) -> None:
    saga_id, order = completing_order()
    env = system._start_envelope(order, saga_id)
    traced = Envelope(**{**{k: getattr(env, k) for k in Envelope.__dataclass_fields__},
                         "trace": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    key, value, headers = encode_record(traced)
    assert ("traceparent", traced.trace.encode()) in headers  # type: ignore[union-attr]
    assert decode_record(key, value, "t", 0, 0).trace == traced.trace
    assert "traceparent" not in dict(encode_record(env)[2])
    with open_store(f"sqlite:///{tmp_path}/t.db") as store:
        store.append([traced])
        assert [e.trace for batch in store.scan() for e in batch] == [traced.trace]


def run_traced(url: str, tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    spans_file = tmp_path / "spans.jsonl"
    env = lambda name: env_with(CHOREO_TRACING="tests.trace_export:setup", CHOREO_TEST_SPANS=str(spans_file))
    saga_id, order = completing_order()
    store = open_store(url)
    try:
        with running(url, env=env, args=lambda name: ["--log-level", "WARNING"], log_dir=tmp_path) as procs:
            with trace.get_tracer("shop").start_as_current_span("checkout"):
                system.start(store, order, saga_id=saga_id)
            wait_for("the saga's end", lambda: any(
                e.type == "OrderConfirmed" for batch in store.scan() for e in batch), 90, procs)
            wait_for("the notification span", lambda: spans_file.exists() and sum(
                1 for line in spans_file.read_text().splitlines() if "notification" in line), 30, procs)
        log = [e for batch in store.scan() for e in batch if e.saga_id == saga_id]
    finally:
        store.close()
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    spans += [span_record(s) for s in exporter.get_finished_spans()]
    root = next(s for s in spans if s["name"] == "checkout")
    assert_one_trace_along_the_causation(spans, log, root)


@pytest.mark.slow
def test_one_trace_across_processes_on_sqlite(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    run_traced(f"sqlite:///{tmp_path}/choreo.db", tmp_path, exporter)


@pytest.mark.slow
def test_one_trace_across_processes_on_kafka(kafka_url: str, tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    run_traced(kafka_url, tmp_path, exporter)
