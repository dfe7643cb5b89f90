"""The `choreo` command line."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from choreo._dlq_cli import add_dlq_commands
from choreo._render import render_mermaid, render_saga
from choreo.errors import ChoreoError
from choreo.projection import STATES, SagaFilter, SagaProjection
from choreo.retry import RetryPolicy
from choreo.runner import run_service
from choreo.saga import SagaDefinition
from choreo.service import Service
from choreo.store import open_store
from choreo.system import System


def load_service(target: str) -> Service:
    """Import `MODULE:ATTRIBUTE` and return the `Service` it names."""
    service: Service = _load(target, Service)
    service.validate()
    return service



def _demo(args: argparse.Namespace) -> int:
    from services.demo import format_summary, run_demo

    summary = run_demo(
        args.store,
        orders=args.orders,
        seed=args.seed,
        processes=args.processes,
        external=args.external,
        timeout=args.timeout,
        progress=None if args.json else sys.stderr,
        fresh=not args.keep,
    )
    if not args.per_saga:
        summary.pop("final_states")
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if summary["invariants_ok"] else 1


def _run(args: argparse.Namespace) -> int:
    service = load_service(args.target)
    store = open_store(args.store)
    # A service process we own: what is loaded now stays, so the collector stops scanning it,
    # and collects young objects less often (a batch allocates many short-lived ones).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        run_service(service, store, batch_size=args.batch_size, retry=RetryPolicy(max_attempts=args.max_attempts))
    finally:
        store.close()
    return 0


def _projection(args: argparse.Namespace) -> SagaProjection:
    projection = SagaProjection(open_store(args.store), sagas=_definitions(args), stuck_after=timedelta(seconds=args.stuck_after))
    projection.update()
    return projection


def _sagas_list(args: argparse.Namespace) -> int:
    where = SagaFilter(
        state=args.state,
        saga_type=args.type,
        started_after=_time(args.since),
        started_before=_time(args.until),
        stuck_for=timedelta(seconds=args.stuck_for) if args.stuck_for is not None else None,
    )
    sagas = _projection(args).list(where)
    if args.json:
        print(json.dumps(sagas, indent=2, sort_keys=True))
        return 0
    for s in sagas:
        print(f"{s['saga_id']}  {s['saga_type'] or '-':<18} {s['state']:<13} {s['started_at']}  {s['cause'] or ''}")
    print(f"{len(sagas)} saga(s)")
    return 0


def _sagas_show(args: argparse.Namespace) -> int:
    as_of: int | datetime | None = None
    if args.as_of is not None:
        as_of = int(args.as_of) if args.as_of.isdigit() else _time(args.as_of)
    saga = _projection(args).get(args.saga_id, as_of=as_of)
    if saga is None:
        print(f"choreo: no saga {args.saga_id!r} in {args.store or 'the store'}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(saga, indent=2, sort_keys=True))
    elif args.mermaid:
        print(render_mermaid(saga))
    else:
        print(render_saga(saga))
    return 0


def _replay(args: argparse.Namespace) -> int:
    projection = SagaProjection(open_store(args.store), sagas=_definitions(args))

    def progress(done: int, size: int | None) -> None:
        width = 40
        if size:
            filled = width * min(done, size) // size
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{size} events")
        else:
            sys.stderr.write(f"\r{done} events")
        sys.stderr.flush()

    count = projection.replay(progress)
    sys.stderr.write("\n")
    print(f"replayed {count} events into {sum(projection.counts().values())} sagas")
    return 0


def _project(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    store = open_store(args.store)
    projection = SagaProjection(store, sagas=_definitions(args))
    while not stop.is_set():
        if projection.update() == 0:
            stop.wait(0.05)
    projection.close()
    store.close()
    return 0


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ChoreoError(f"not a position or ISO time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _load(target: str, kind: type) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ChoreoError(f"expected MODULE:NAME (e.g. services.payment:service), got {target!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as e:
        raise ChoreoError(f"cannot import module {module_name!r}: {e}") from e
    if not isinstance(obj, kind):
        raise ChoreoError(f"{target!r} is not a choreo {kind.__name__} (found {type(obj).__name__})")
    return obj


def _definitions(args: argparse.Namespace) -> tuple[SagaDefinition, ...]:
    return _load(args.system, System).sagas if args.system else ()


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the `choreo` command."""
    parser = argparse.ArgumentParser(prog="choreo", description="Choreography-based, event-sourced sagas.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the services do")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the order-fulfilment example and audit it")
    demo.add_argument("--store", default="sqlite:///choreo-demo.db", help="store URL (default: %(default)s)")
    demo.add_argument("--orders", type=int, default=300, help="orders to place (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the order mix (default: %(default)s)")
    demo.add_argument("--processes", action="store_true", help="run each service in its own process")
    demo.add_argument("--external", action="store_true",
                      help="the services already run elsewhere (e.g. docker compose): only place, wait and audit")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every saga to end")
    demo.add_argument("--keep", action="store_true", help="keep an existing demo database instead of starting afresh")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--per-saga", action="store_true", help="include each saga's final state in the summary")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="run one service in this process until SIGINT/SIGTERM")
    run.add_argument("target", help="MODULE:SERVICE, e.g. services.payment:service")
    run.add_argument("--store", default=None, help="store URL (default: $CHOREO_STORE or sqlite:///choreo.db)")
    run.add_argument("--batch-size", type=int, default=1000, help="events per transaction (default: %(default)s)")
    run.add_argument("--max-attempts", type=int, default=3, help="tries before an event is parked (default: %(default)s)")
    run.set_defaults(func=_run)

    def projection_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=None, help="store URL (default: $CHOREO_STORE or sqlite:///choreo.db)")
        p.add_argument("--system", default="services:system",
                       help="MODULE:SYSTEM whose saga definitions name the steps (default: %(default)s; '' for none)")
        p.add_argument("--stuck-after", type=float, default=300.0,
                       help="seconds without progress after which a saga counts as stuck (default: %(default)s)")

    sagas = sub.add_parser("sagas", help="query the saga projection")
    sagas_sub = sagas.add_subparsers(dest="sagas_command", required=True)
    ls = sagas_sub.add_parser("list", help="list sagas")
    projection_options(ls)
    ls.add_argument("--state", choices=STATES, help="only sagas in this state")
    ls.add_argument("--type", help="only sagas of this saga type")
    ls.add_argument("--since", help="only sagas started at or after this ISO time")
    ls.add_argument("--until", help="only sagas started before this ISO time")
    ls.add_argument("--stuck-for", type=float, help="only sagas with no progress for this many seconds")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_sagas_list)
    show = sagas_sub.add_parser("show", help="show one saga: summary, steps, timeline")
    projection_options(show)
    show.add_argument("saga_id")
    show.add_argument("--as-of", help="the saga as it stood at this log position or ISO time")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--mermaid", action="store_true", help="print a Mermaid sequence diagram")
    show.set_defaults(func=_sagas_show)

    replay = sub.add_parser("replay", help="drop the saga projection and rebuild it from position 0")
    replay.add_argument("--store", default=None, help="store URL (default: $CHOREO_STORE or sqlite:///choreo.db)")
    replay.add_argument("--system", default="services:system", help="MODULE:SYSTEM with saga definitions")
    replay.set_defaults(func=_replay)

    project = sub.add_parser("project", help="keep the saga projection up to date until SIGINT/SIGTERM")
    project.add_argument("--store", default=None, help="store URL (default: $CHOREO_STORE or sqlite:///choreo.db)")
    project.add_argument("--system", default="services:system", help="MODULE:SYSTEM with saga definitions")
    project.set_defaults(func=_project)

    add_dlq_commands(sub, _load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `choreo` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # kafka-python logs every failed connection attempt; choreo reports what matters itself
    logging.getLogger("kafka").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return int(args.func(args))
    except ChoreoError as e:
        print(f"choreo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
