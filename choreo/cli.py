"""The `choreo` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from choreo.errors import ChoreoError
from choreo.processor import RetryPolicy
from choreo.runner import run_service
from choreo.service import Service
from choreo.store import open_store


def load_service(target: str) -> Service:
    """Import `MODULE:ATTRIBUTE` and return the `Service` it names."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ChoreoError(f"expected MODULE:SERVICE (e.g. services.payment:service), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ChoreoError(f"cannot import module {module_name!r}: {e}") from e
    service = getattr(module, attr, None)
    if not isinstance(service, Service):
        raise ChoreoError(f"{target!r} is not a choreo Service (found {type(service).__name__})")
    service.validate()
    return service


def _demo(args: argparse.Namespace) -> int:
    from services.demo import format_summary, run_demo

    summary = run_demo(
        args.store,
        orders=args.orders,
        seed=args.seed,
        processes=args.processes,
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
    try:
        run_service(service, store, batch_size=args.batch_size, retry=RetryPolicy(max_attempts=args.max_attempts))
    finally:
        store.close()
    return 0


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
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every saga to end")
    demo.add_argument("--keep", action="store_true", help="keep an existing demo database instead of starting afresh")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--per-saga", action="store_true", help="include each saga's final state in the summary")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="run one service in this process until SIGINT/SIGTERM")
    run.add_argument("target", help="MODULE:SERVICE, e.g. services.payment:service")
    run.add_argument("--store", default=None, help="store URL (default: $CHOREO_STORE or sqlite:///choreo.db)")
    run.add_argument("--batch-size", type=int, default=200, help="events per transaction (default: %(default)s)")
    run.add_argument("--max-attempts", type=int, default=3, help="tries before an event is parked (default: %(default)s)")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `choreo` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except ChoreoError as e:
        print(f"choreo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
