"""Prometheus metrics and health probes of a service process (`pip install "choreo[metrics]"`).

Nothing is counted until `enable()` is called (`choreo run --metrics-port N` calls it,
and serves the registry with `serve()`); until then each hook is one global lookup.

Metrics, by prometheus-client's conventions (`choreo_` prefix, seconds, `_total`):

- `choreo_events_handled_total{service,type}`: events the service processed and committed
  (once each; an event parked is counted as parked instead);
- `choreo_events_failed_total{service,type}`: handler runs that raised;
- `choreo_events_retried_total{service,type}`: failures scheduled for another attempt;
- `choreo_events_parked_total{service,type}`: events parked as dead letters;
- `choreo_handler_duration_seconds{service,type}`: a histogram of handler run times (every
  run: one that fails, or that runs again because another event of its batch failed, too);
- `choreo_lag_events{service,source}`: the log's head minus the service's position in it,
  read at each scrape (`source` is `log` on SQLite and PostgreSQL, `TOPIC:PARTITION` on Kafka;
  a replica's is the head minus the least position of the segments it holds);
- `choreo_sagas{state}`: sagas by state, from the saga projection (in the service that
  ends sagas, which brings the projection up to date first when it was built with the
  same saga definitions; elsewhere from what is stored);
- `choreo_last_poll_age_seconds{service}`: how long ago the service's loop last polled.

The probes: `/healthz` answers 200 while the service's loop polls (at most
`stale_after` seconds ago), and `/readyz` answers 200 when the store answers and the
service's lag is at most `max_lag` events; both answer 503 with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

    from choreo.events import Envelope
    from choreo.processor import Processor

log = logging.getLogger("choreo")
_ACTIVE: Metrics | None = None
_NOTHING = contextlib.nullcontext()


class Metrics:
    """choreo's metrics in one prometheus-client registry, and the services they watch."""

    def __init__(self, registry: Any = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:  # pragma: no cover - the message is the point
            from choreo._cli_common import UsageError

            raise UsageError('metrics need prometheus-client: pip install "choreo[metrics]"') from None
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["service", "type"]
        self.handled = Counter("choreo_events_handled", "Events processed and committed", labels,
                               registry=self.registry)
        self.failed = Counter("choreo_events_failed", "Handler runs that raised", labels, registry=self.registry)
        self.retried = Counter("choreo_events_retried", "Failures scheduled for another attempt", labels,
                               registry=self.registry)
        self.parked = Counter("choreo_events_parked", "Events parked as dead letters", labels, registry=self.registry)
        self.duration = Histogram("choreo_handler_duration_seconds", "Handler run time", labels,
                                  registry=self.registry)
        self.probes: dict[str, Probe] = {}
        self._children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.registry.register(_Collector(self))

    def children(self, service: str, event_type: str) -> tuple[Any, Any, Any]:
        """The handled and failed counters and the duration histogram of one service and event type."""
        found = self._children.get((service, event_type))
        if found is None:
            found = self._children[service, event_type] = (
                self.handled.labels(service, event_type), self.failed.labels(service, event_type),
                self.duration.labels(service, event_type))
        return found


def enable(registry: Any = None) -> Metrics:
    """Start counting (into `registry`, else a new one); return the metrics."""
    global _ACTIVE
    _ACTIVE = Metrics(registry)
    return _ACTIVE


def disable() -> None:
    """Stop counting and forget the watched services."""
    global _ACTIVE
    _ACTIVE = None


def handling(service: str, env: Envelope, runs: bool) -> contextlib.AbstractContextManager[Any]:
    """Around one event's handlers in a service: count and time them (nothing when metrics are off)."""
    if _ACTIVE is None or not runs:
        return _NOTHING
    return _Timed(_ACTIVE.children(service, env.type))


class _Timed:
    """Times a handler run and counts it if it raised (a class, not a generator: it runs for every event)."""

    __slots__ = ("children", "started")

    def __init__(self, children: tuple[Any, Any, Any]) -> None:
        self.children = children
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self.children[2].observe(time.perf_counter() - self.started)
        if kind is not None and issubclass(kind, Exception):
            self.children[1].inc()


def handled(service: str, envelopes: Iterable[Envelope]) -> None:
    """Count events whose handling was committed (once each, whatever ran again before the commit)."""
    if _ACTIVE is not None:
        for env in envelopes:
            _ACTIVE.children(service, env.type)[0].inc()


def retried(service: str, event_type: str) -> None:
    """Count a failure scheduled for another attempt."""
    if _ACTIVE is not None:
        _ACTIVE.retried.labels(service, event_type).inc()


def parked(service: str, event_type: str) -> None:
    """Count an event parked as a dead letter."""
    if _ACTIVE is not None:
        _ACTIVE.parked.labels(service, event_type).inc()


def watch(processor: Processor) -> None:
    """Report `processor`'s lag, loop and sagas (called by every new processor; nothing when metrics are off)."""
    if _ACTIVE is not None:
        _ACTIVE.probes[processor.service.name] = Probe(processor)


class Probe:
    """What the metrics and probes read of one running service: its position, the log's head, its loop."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self._ends: tuple[float, dict[int, int]] | None = None
        self._projection: Any = None
        self._sagas_at = 0.0
        self._sagas: dict[str, int] = {}

    def lag(self) -> dict[str, int]:
        """The log's head minus the service's position, by source; raises if the store does not answer."""
        p = self.processor
        store = p.store
        positions = dict(p.own.tracking())
        for source, pos in list(p.tracking.items()):
            positions[source] = max(pos, positions.get(source, 0))
        feed = p.feed
        if hasattr(store, "last_position"):  # one log with a global position (SQLite, PostgreSQL, memory)
            if p.replica is not None:  # a replica: the least position of the segments it holds ("log" is fenced)
                if not p.replica.tokens:
                    return {"log": 0}  # none of the work is its own now
                done = p.replica.start("log", positions)
            else:
                done = positions.get("log", 0)
            read = max(getattr(feed, "position", 0) or 0, done)
            return {"log": max(0, store.last_position() - read)}
        ends = self._partition_ends(store)
        read_next: dict[str, int] = getattr(feed, "next_offsets", dict)()  # a Kafka feed's (the upcasting feed forwards it)
        topic = getattr(store, "topic", "")
        return {f"{topic}:{part}": max(0, end - max(positions.get(f"{topic}:{part}", 0),
                                                     read_next.get(f"{topic}:{part}", 0)))
                for part, end in sorted(ends.items())}

    def _partition_ends(self, store: Any) -> dict[int, int]:
        now = time.monotonic()
        if self._ends is None or now - self._ends[0] > 1.0:  # a scrape and a probe share one broker request
            self._ends = (now, store.partition_ends())
        return self._ends[1]

    def poll_age(self) -> float | None:
        """Seconds since the service's loop last polled (None: it has not yet)."""
        last = getattr(self.processor, "last_poll", None)
        return None if last is None else time.monotonic() - last

    def sagas(self) -> dict[str, int]:
        """Sagas by state from the projection (updated here if this service ends sagas); every 5 s at most."""
        now = time.monotonic()
        if now - self._sagas_at < 5.0 and self._sagas_at:
            return self._sagas
        from choreo._saga_fold import NO_SAGA_COUNT
        from choreo.projection import SagaProjection

        p = self.processor
        if self._projection is None:
            self._projection = SagaProjection(p.store, sagas=p.service.sagas.values(),
                                              read_only=p.store.read_only or not p.service.sagas)
        projection = self._projection
        if not projection.read_only and projection.outdated() is None:
            projection.update()
        counts = projection.counts()
        counts.pop(NO_SAGA_COUNT, None)
        self._sagas, self._sagas_at = counts, now
        return counts


class _Collector:
    """Reads the watched services at each scrape: lag, loop age, sagas by state."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        lag = GaugeMetricFamily("choreo_lag_events", "The log's head minus the service's position",
                                labels=["service", "source"])
        age = GaugeMetricFamily("choreo_last_poll_age_seconds", "Seconds since the service's loop last polled",
                                labels=["service"])
        sagas = GaugeMetricFamily("choreo_sagas", "Sagas by state, from the saga projection", labels=["state"])
        counted: dict[str, int] = {}
        for name, probe in list(self.metrics.probes.items()):
            try:
                for source, n in probe.lag().items():
                    lag.add_metric([name, source], n)
            except Exception as e:
                log.warning("%s: metrics: cannot read the lag: %s: %s", name, type(e).__name__, e)
            poll_age = probe.poll_age()
            if poll_age is not None:
                age.add_metric([name], poll_age)
            try:
                for state, n in probe.sagas().items():
                    counted[state] = max(counted.get(state, 0), n)
            except Exception as e:
                log.warning("%s: metrics: cannot read the saga projection: %s: %s", name, type(e).__name__, e)
        for state, n in sorted(counted.items()):
            sagas.add_metric([state], n)
        yield from (lag, age, sagas)


def health(metrics: Metrics, *, stale_after: float) -> tuple[bool, dict[str, Any]]:
    """`/healthz`: whether every watched service's loop polled within `stale_after` seconds."""
    if not metrics.probes:
        return False, {"status": "starting", "reason": "no service loop runs yet"}
    report: dict[str, Any] = {}
    ok = True
    for name, probe in metrics.probes.items():
        age = probe.poll_age()
        alive = age is not None and age <= stale_after
        ok &= alive
        report[name] = {"alive": alive, "last_poll_age_s": None if age is None else round(age, 3)}
    return ok, {"status": "ok" if ok else "stalled", "services": report}


def readiness(metrics: Metrics, *, max_lag: int) -> tuple[bool, dict[str, Any]]:
    """`/readyz`: whether the store answers and every watched service lags at most `max_lag` events."""
    if not metrics.probes:
        return False, {"status": "starting", "reason": "no service loop runs yet"}
    report: dict[str, Any] = {}
    ok = True
    for name, probe in metrics.probes.items():
        try:
            lag = probe.lag()
        except Exception as e:
            ok = False
            report[name] = {"ready": False, "reason": f"the store does not answer: {type(e).__name__}: {e}"}
            continue
        total = sum(lag.values())
        ready = total <= max_lag
        ok &= ready
        report[name] = {"ready": ready, "lag": total}
        if not ready:
            report[name]["reason"] = f"{total} events behind (at most {max_lag} allowed)"
    return ok, {"status": "ready" if ok else "not ready", "services": report}


def serve(metrics: Metrics, port: int, host: str = "0.0.0.0", *, max_lag: int = 10_000,
          stale_after: float = 60.0) -> ThreadingHTTPServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `host:port` from a daemon thread; return the server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                return
            if path in ("/healthz", "/readyz"):
                ok, report = (health(metrics, stale_after=stale_after) if path == "/healthz"
                              else readiness(metrics, max_lag=max_lag))
                self._send(200 if ok else 503, json.dumps(report).encode(), "application/json")
                return
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="choreo-metrics", daemon=True).start()
    return server
