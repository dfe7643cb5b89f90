"""`choreo dlq`: list, show, retry, skip parked events, and force a saga to compensate."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from choreo.operations import (
    find_dead_letter, force_compensation, list_dead_letters, request_retry, request_skip,
)
from choreo.store import DeadLetter, EventStore, open_store
from choreo.system import System

STATUSES = ("parked", "retried", "skipped", "all")


def add_dlq_commands(sub: Any, load_system: Any) -> None:
    """Add `choreo dlq ...` to the command line's subparsers."""
    dlq = sub.add_parser("dlq", help="parked events: list, show, retry, skip; force compensation")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=None, help="store URL (default: $CHOREO_STORE or sqlite:///choreo.db)")
        p.add_argument("--system", default="services:system", help="MODULE:SYSTEM whose services to look at")
        p.set_defaults(load_system=load_system)

    ls = dlq_sub.add_parser("list", help="list dead letters (parked events)")
    common(ls)
    ls.add_argument("--service", help="only this service's")
    ls.add_argument("--saga", help="only this saga's")
    ls.add_argument("--status", choices=STATUSES, default="parked", help="(default: %(default)s)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)
    show = dlq_sub.add_parser("show", help="show one dead letter: reason, error, the raw event")
    common(show)
    show.add_argument("ref", help="SERVICE:ID, as `dlq list` prints it")
    show.set_defaults(func=_show)
    retry = dlq_sub.add_parser("retry", help="run parked events again, then release what waits behind them")
    common(retry)
    retry.add_argument("ref", nargs="?", help="SERVICE:ID")
    retry.add_argument("--all", action="store_true", help="every parked event (the first of each saga)")
    retry.add_argument("--reason", default="", help="why (kept in the saga's timeline)")
    retry.set_defaults(func=_retry)
    skip = dlq_sub.add_parser("skip", help="mark a parked event handled without running it")
    common(skip)
    skip.add_argument("ref", help="SERVICE:ID")
    skip.add_argument("--reason", required=True, help="why (kept in the saga's timeline)")
    skip.set_defaults(func=_skip)
    comp = dlq_sub.add_parser("compensate", help="fail a saga so that every participant compensates")
    common(comp)
    comp.add_argument("saga_id")
    comp.add_argument("--reason", required=True, help="why (kept in the saga's timeline)")
    comp.set_defaults(func=_compensate)


def _store(args: argparse.Namespace) -> EventStore:
    return open_store(args.store)


def _services(args: argparse.Namespace) -> list[str]:
    system: System = args.load_system(args.system, System)
    return sorted(system.services)


def _row(d: DeadLetter) -> dict[str, Any]:
    row = asdict(d)
    row["ref"] = f"{d.service}:{d.id}"
    row["first_failed_at"] = d.first_failed_at.isoformat()
    row["last_failed_at"] = d.last_failed_at.isoformat()
    return row


def _list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        services = [args.service] if args.service else _services(args)
        status = None if args.status == "all" else args.status
        letters = list_dead_letters(store, services, status=status, saga_id=args.saga)
    if args.json:
        print(json.dumps([_row(d) for d in letters], indent=2, sort_keys=True))
        return 0
    for d in letters:
        print(f"{d.service}:{d.id:<5} {d.status:<8} saga {d.saga_id or '-'}  {d.type or '?'}  "
              f"attempts {d.attempts}  {d.reason}")
    print(f"{len(letters)} dead letter(s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        print(json.dumps(_row(find_dead_letter(store, args.ref)), indent=2, sort_keys=True))
    return 0


def _retry(args: argparse.Namespace) -> int:
    with _store(args) as store:
        if args.all:
            letters = list_dead_letters(store, _services(args))
            firsts = {(d.service, d.saga_id): d for d in reversed(letters)}  # the first parked of each saga
            targets = sorted(firsts.values(), key=lambda d: (d.service, d.id or 0))
        elif args.ref:
            targets = [find_dead_letter(store, args.ref)]
        else:
            raise SystemExit("choreo dlq retry: give SERVICE:ID or --all")
        for d in targets:
            request_retry(store, d, args.reason)
            print(f"retry of {d.service}:{d.id} requested (saga {d.saga_id}); {d.service} carries it out")
    return 0


def _skip(args: argparse.Namespace) -> int:
    with _store(args) as store:
        d = find_dead_letter(store, args.ref)
        request_skip(store, d, args.reason)
        print(f"skip of {d.service}:{d.id} requested (saga {d.saga_id}); {d.service} carries it out")
    return 0


def _compensate(args: argparse.Namespace) -> int:
    with _store(args) as store:
        event_id = force_compensation(store, args.saga_id, args.reason)
    print(f"saga {args.saga_id} failed by the operator (event {event_id}); its participants compensate")
    return 0
