"""`choreo run` (one service as a process) and `choreo demo` (the example, from a checkout)."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import sys
from types import ModuleType
from typing import Any

from choreo._cli_common import (
    UsageError, add_command, add_store_option, cwd_on_path, load, non_negative_int, positive_int, positive_seconds,
)
from choreo import metrics, tracing
from choreo.replicas import DEFAULT_SEGMENTS, ReplicaSettings
from choreo.retry import RetryPolicy
from choreo.runner import run_service
from choreo.service import Service
from choreo.store import EventStore, LogStore, open_store


def load_service(target: str) -> Service:
    """Import `MODULE:ATTRIBUTE` (the current directory first) and return the `Service` it names."""
    service = load(target, Service)
    service.validate()
    return service


def add_run_commands(sub: Any) -> None:
    """Add `choreo demo` and `choreo run` to the command line's subparsers."""
    demo = add_command(sub, "demo", "run the order-fulfilment example (from a choreo checkout) and audit it")
    add_store_option(demo)
    demo.add_argument("--orders", type=positive_int, default=300, help="orders to place (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the order mix (default: %(default)s)")
    demo.add_argument("--processes", action="store_true", help="run each service in its own process")
    demo.add_argument("--external", action="store_true",
                      help="the services already run elsewhere (e.g. docker compose): only place, wait and audit")
    demo.add_argument("--timeout", type=positive_seconds, default=300.0, metavar="SECONDS",
                      help="seconds to wait for every saga to end (default: %(default)s)")
    kept = demo.add_mutually_exclusive_group()
    kept.add_argument("--keep", action="store_true", help="keep a previous demo's data instead of starting afresh")
    kept.add_argument("--reset", action="store_true",
                      help="delete the SQLite store first even if it holds data that is not the demo's")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--per-saga", action="store_true", help="include each saga's final state in the summary")
    demo.set_defaults(func=_demo)

    run = add_command(sub, "run", "run one service in this process until SIGINT/SIGTERM")
    run.add_argument("target",
                     help="MODULE:SERVICE, e.g. services.payment:service (the current directory is searched first)")
    add_store_option(run)
    run.add_argument("--batch-size", type=positive_int, default=1000,
                     help="events per transaction (default: %(default)s)")
    run.add_argument("--max-attempts", type=positive_int, default=3,
                     help="tries before an event is parked (default: %(default)s)")
    run.add_argument("--concurrency", type=positive_int, default=None,
                     help="sagas handled at once (default: the service's; 256 with async handlers, else 1)")
    run.add_argument("--threads", type=non_negative_int, default=None,
                     help="run plain handlers in a pool of this many threads (default: the service's, 0)")
    run.add_argument("--segments", type=positive_int, default=None,
                     help="run as one replica of the service, its work split into this many segments (default: "
                          "the service's `segments`; without either, the process does all the work, as one)")
    run.add_argument("--lease", type=positive_seconds, default=10.0, metavar="SECONDS",
                     help="replicas: seconds a claim on a segment lasts unless renewed, the failover time after "
                          "a crash (default: %(default)s)")
    run.add_argument("--wait-lease", action="store_true",
                     help="replicas: take a crashed replica's segments only when its lease ends, even when it ran "
                          "on this host (by default a replica whose process is gone here is taken over at once)")
    run.add_argument("--reset-positions", action="store_true",
                     help="first reset the service's positions in the log (Kafka, after the log lost data)")
    run.add_argument("--metrics-port", type=non_negative_int, default=None, metavar="PORT",
                     help="serve Prometheus /metrics, /healthz and /readyz on this port (pip install choreo[metrics])")
    run.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                     help="the address to serve them on (default: %(default)s)")
    run.add_argument("--ready-max-lag", type=non_negative_int, default=10_000, metavar="EVENTS",
                     help="/readyz fails while the service is more events behind the log's head "
                          "(default: %(default)s)")
    run.set_defaults(func=_run)


def example() -> ModuleType:
    """The example's `services.demo`, imported from the current directory (a choreo checkout)."""
    cwd_on_path()
    try:
        return importlib.import_module("services.demo")
    except ModuleNotFoundError as e:
        if e.name not in ("services", "services.demo"):
            raise UsageError(f"the example in ./services cannot be imported: {e}") from e
        raise UsageError(
            "choreo demo runs the example system in ./services: run it from the root of a choreo checkout"
        ) from None


def _demo(args: argparse.Namespace) -> int:
    if args.reset and args.external:
        raise UsageError("--reset deletes the store, which --external services are using")
    demo = example()
    summary: dict[str, Any] = demo.run_demo(
        args.store,
        orders=args.orders,
        seed=args.seed,
        processes=args.processes,
        external=args.external,
        timeout=args.timeout,
        progress=sys.stderr if not args.json and sys.stderr.isatty() else None,
        fresh=not args.keep,
        reset=args.reset,
    )
    if not args.per_saga:
        summary.pop("final_states")
    print(json.dumps(summary, indent=2) if args.json else demo.format_summary(summary))
    return 0 if summary["invariants_ok"] else 1


def _run(args: argparse.Namespace) -> int:
    service = load_service(args.target)
    tracing.configure_from_env()
    server = None
    if args.metrics_port is not None:
        try:
            server = metrics.serve(metrics.enable(), args.metrics_port, args.metrics_host,
                                   max_lag=args.ready_max_lag)
        except OSError as e:
            raise UsageError(f"--metrics-port {args.metrics_port}: cannot serve on {args.metrics_host}: {e}") from e
        logging.getLogger("choreo").info("%s: metrics on http://%s:%d/metrics", service.name, args.metrics_host,
                                         server.server_address[1])
    if args.reset_positions:  # no reset of a store that does not exist
        open_store(args.store, create=False).close()
    store = open_store(args.store)
    choreo_log = logging.getLogger("choreo")
    level = choreo_log.level
    try:
        if args.reset_positions:
            _reset_positions(store, service.name)
        if not args.verbose and not args.log_level:
            choreo_log.setLevel(logging.INFO)  # a service process logs its start and stop lines
        # A service process we own: what is loaded now stays, so the collector stops scanning it,
        # and collects young objects less often (a batch allocates many short-lived ones).
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        run_service(service, store, batch_size=args.batch_size, retry=RetryPolicy(max_attempts=args.max_attempts),
                    concurrency=args.concurrency, threads=args.threads, replica=_replica(args, service, store))
    finally:
        store.close()
        choreo_log.setLevel(level)
        if server is not None:
            server.shutdown()
            metrics.disable()
    return 0


def _replica(args: argparse.Namespace, service: Service, store: EventStore) -> ReplicaSettings | None:
    """How this process runs as a replica of the service, or None if it does all the work."""
    segments = args.segments or service.segments
    if segments is None:
        return None
    if not (isinstance(store, LogStore) and store.service(service.name).supports_claims):
        if args.segments:
            raise UsageError(f"--segments: the store {store.url} cannot split a service's work among replicas "
                             "(on Kafka, a service's processes share the topic's partitions instead)")
        return None  # the service's own `segments`: on Kafka, its processes form a consumer group
    return ReplicaSettings(segments=segments or DEFAULT_SEGMENTS, lease=args.lease, reap_local=not args.wait_lease)


def _reset_positions(store: EventStore, name: str) -> None:
    """Reset the service's positions (Kafka's `reset_positions`) and print each one that changed."""
    reset = getattr(store, "reset_positions", None)
    if reset is None:
        raise UsageError(f"--reset-positions: only Kafka stores have positions to reset, not {store.url}")
    before = store.service(name).tracking()
    changed: dict[str, int] = reset(name)
    if not changed:
        print(f"{name}: no position to reset")
    for source, position in sorted(changed.items()):
        print(f"{name}: position in {source} reset from {before.get(source, 0)} to {position}")
