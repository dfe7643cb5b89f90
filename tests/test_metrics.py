"""Prometheus metrics and health probes: `choreo run --metrics-port` on SQLite and Kafka, and the probes' logic."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from choreo import Envelope, InMemoryStore, Processor, ReplicaSettings, metrics, open_store
from services import TARGETS, system
from services.demo import plan
from services.payment import service as payment
from tests.service_processes import running, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def bogus(saga_id: str) -> Envelope:
    """An event of a type no service knows: every service parks it."""
    return Envelope(event_id=f"bogus-{saga_id}", type="NoSuchEvent", version=1, saga_id=saga_id, causation_id=None,
                    service="elsewhere", step=None, outcome=None, occurred_at=datetime.now(timezone.utc), payload="{}")


def run_scraped(url: str, tmp_path: Path) -> None:
    ports = {name: free_port() for name in TARGETS}
    planned = plan(40, 7)
    wanted = {s for s, _, _, _ in planned}
    store = open_store(url)
    try:
        with running(url, args=lambda name: ["--metrics-port", str(ports[name]), "--metrics-host", "127.0.0.1"],
                     log_dir=tmp_path) as procs:
            wait_for("every /healthz", lambda: all(get(p, "/healthz")[0] == 200 for p in ports.values()), 60, procs)
            for saga_id, order, _, _ in planned:
                system.start(store, order, saga_id=saga_id)
            store.append([bogus(planned[0][0] + "-x")])
            ends = {"OrderConfirmed", "OrderCancelled"}
            wait_for("every saga's end", lambda: wanted <= {
                e.saga_id for batch in store.scan() for e in batch if e.type in ends}, 120, procs)

            def scraped() -> dict[str, dict] | None:
                got = {name: samples(get(port, "/metrics")[1]) for name, port in ports.items()}
                settled = all(got[n].get(("choreo_lag_events", tuple(sorted({"service": n, "source": s}.items()))), 1) == 0
                              for n in got for s in sources(got[n], n))
                done = got["orders"].get(("choreo_sagas", (("state", "completed"),)), 0) + \
                    got["orders"].get(("choreo_sagas", (("state", "failed"),)), 0) == len(planned)
                return got if settled and done else None

            got = wait_for("lag 0 and the sagas counted", scraped, 60, procs)
            for name, port in ports.items():
                status, body = get(port, "/readyz")
                assert status == 200 and json.loads(body)["services"][name]["lag"] == 0, body
            assert get(ports["orders"], "/nothing")[0] == 404
    finally:
        store.close()
    pay = got["payment"]
    handled = pay[("choreo_events_handled_total", (("service", "payment"), ("type", "ItemsReserved")))]
    reserved = sum(1 for _, o, state, cause in planned if cause != "out of stock")
    flaky = sum(1 for _, o, _, _ in planned if o.customer_id.startswith("flaky-"))
    assert flaky > 0 and handled == reserved
    assert pay[("choreo_events_failed_total", (("service", "payment"), ("type", "ItemsReserved")))] == flaky
    assert pay[("choreo_events_retried_total", (("service", "payment"), ("type", "ItemsReserved")))] == flaky
    assert pay[("choreo_handler_duration_seconds_count", (("service", "payment"), ("type", "ItemsReserved")))] \
        >= reserved + flaky  # and runs again of a batch's events before the one that failed
    for name in TARGETS:  # the unknown event is parked everywhere
        assert got[name][("choreo_events_parked_total", (("service", name), ("type", "NoSuchEvent")))] == 1
    counts = {state: got["orders"].get(("choreo_sagas", (("state", state),)), 0) for state in ("completed", "failed")}
    assert counts == {"completed": sum(1 for p in planned if p[2] == "completed"),
                      "failed": sum(1 for p in planned if p[2] == "failed")}


def sources(got: dict, service: str) -> list[str]:
    return [dict(labels)["source"] for (name, labels) in got if name == "choreo_lag_events"
            and dict(labels)["service"] == service] or ["?"]


@pytest.mark.slow
def test_metrics_and_probes_of_service_processes_on_sqlite(tmp_path: Path) -> None:
    run_scraped(f"sqlite:///{tmp_path}/choreo.db", tmp_path)


@pytest.mark.slow
def test_metrics_and_probes_of_service_processes_on_kafka(kafka_url: str, tmp_path: Path) -> None:
    run_scraped(kafka_url, tmp_path)


@pytest.fixture
def enabled() -> Iterator[metrics.Metrics]:
    yield metrics.enable()
    metrics.disable()


def test_health_and_readiness(enabled: metrics.Metrics) -> None:
    assert metrics.health(enabled, stale_after=60)[0] is False  # no loop yet
    store = InMemoryStore()
    processor = Processor(payment, store)
    for saga_id, order, _, _ in plan(3, 7):
        system.start(store, order, saga_id=saga_id)
    assert metrics.health(enabled, stale_after=60)[0] is False  # it never polled
    ready, report = metrics.readiness(enabled, max_lag=0)
    assert not ready and "3 events behind" in report["services"]["payment"]["reason"]
    assert metrics.readiness(enabled, max_lag=3)[0]
    processor.run_until_idle()
    assert metrics.health(enabled, stale_after=60)[0] is True
    assert metrics.health(enabled, stale_after=0)[0] is False  # stalled: it has not polled for 0 s
    assert metrics.readiness(enabled, max_lag=0) == (True, {"status": "ready", "services": {
        "payment": {"ready": True, "lag": 0}}})
    store.close()
    broken = Processor(payment, InMemoryStore())
    broken.store.last_position = lambda: 1 / 0  # type: ignore[method-assign]
    ready, report = metrics.readiness(enabled, max_lag=10)
    assert not ready and "does not answer: ZeroDivisionError" in report["services"]["payment"]["reason"]


def test_a_replicas_lag_counts_from_the_segments_it_holds(enabled: metrics.Metrics) -> None:
    store = InMemoryStore()
    processor = Processor(payment, store, replica=ReplicaSettings(segments=4))
    for saga_id, order, _, _ in plan(3, 7):
        system.start(store, order, saga_id=saga_id)
    ready, report = metrics.readiness(enabled, max_lag=0)  # its whole-service key is fenced: not "0 behind"
    assert not ready and "3 events behind" in report["services"]["payment"]["reason"]
    processor.run_until_idle()
    assert metrics.readiness(enabled, max_lag=0)[0]
    store.close()


def test_nothing_is_counted_until_enabled() -> None:
    assert metrics._ACTIVE is None
    store = InMemoryStore()
    processor = Processor(payment, store)
    assert metrics.handling("payment", bogus("x"), True) is metrics._NOTHING
    processor.close()
