"""`choreo dlq`: list, show, retry, skip parked events, and force a saga to compensate.

No dlq command creates a store: each reads through a read-only store (a missing store or
service is `StoreNotFound`, exit 1), and the write commands open the store to write only
once what they act on was found there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from collections.abc import Iterable
from typing import Any

from choreo._cli_common import (
    UsageError, add_command, add_store_option, add_system_option, dead_letter_ref, open_existing, system_of, text,
)
from choreo.errors import StoreNotFound
from choreo.operations import (
    find_dead_letter, force_compensation, list_dead_letters, request_retry, request_skip,
)
from choreo.saga import SagaDefinition
from choreo.store import DeadLetter, EventStore

STATUSES = ("parked", "retrying", "retried", "skipped", "failed", "unpublished", "all")


def add_dlq_commands(sub: Any) -> None:
    """Add `choreo dlq ...` to the command line's subparsers."""
    dlq = add_command(sub, "dlq", "parked events: list, show, retry, skip; force compensation")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)

    ls = add_command(dlq_sub, "list", "list dead letters (parked events)")
    add_store_option(ls)
    add_system_option(ls, "whose services to look at (needed unless --service is given)")
    ls.add_argument("--service", help="only this service's")
    ls.add_argument("--saga", help="only this saga's")
    ls.add_argument("--status", choices=STATUSES, default="parked", help="(default: %(default)s)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)
    show = add_command(dlq_sub, "show", "show one dead letter: reason, error, the raw event")
    add_store_option(show)
    show.add_argument("ref", type=dead_letter_ref, help="SERVICE:ID, as `dlq list` prints it")
    show.set_defaults(func=_show)
    retry = add_command(dlq_sub, "retry", "run parked events again, then release what waits behind them")
    add_store_option(retry)
    add_system_option(retry, "whose services to look at (needed by --all)")
    retry.add_argument("ref", nargs="?", type=dead_letter_ref, help="SERVICE:ID")
    retry.add_argument("--all", action="store_true", help="every parked event (the first of each saga)")
    retry.add_argument("--reason", default="", help="why (kept in the saga's timeline)")
    retry.set_defaults(func=_retry)
    skip = add_command(dlq_sub, "skip", "mark a parked event handled without running it")
    add_store_option(skip)
    skip.add_argument("ref", type=dead_letter_ref, help="SERVICE:ID")
    skip.add_argument("--reason", required=True, type=text, help="why (kept in the saga's timeline)")
    skip.set_defaults(func=_skip)
    comp = add_command(dlq_sub, "compensate", "fail a running saga so that every participant compensates")
    add_store_option(comp)
    add_system_option(comp, "whose saga definitions' end events also show that a saga ended (optional)")
    comp.add_argument("saga_id")
    comp.add_argument("--reason", required=True, type=text, help="why (kept in the saga's timeline)")
    comp.set_defaults(func=_compensate)


def dead_letters_of(
    store: EventStore, services: Iterable[str], status: str | None, saga_id: str | None = None
) -> list[DeadLetter]:
    """The dead letters of these services (a service that never ran on this store has none)."""
    letters: list[DeadLetter] = []
    for name in services:
        try:
            letters += list_dead_letters(store, [name], status=status, saga_id=saga_id)
        except StoreNotFound:
            continue  # no tables: the service never ran on this store
    return letters


def _letters(store: EventStore, args: argparse.Namespace, status: str | None) -> list[DeadLetter]:
    """The dead letters of `--service`, or of every service of the system (a service that never ran has none)."""
    if getattr(args, "service", None):
        return list_dead_letters(store, [args.service], status=status, saga_id=getattr(args, "saga", None))
    system = system_of(args, "the system's service names are needed to look at every service (or give --service NAME)")
    assert system is not None
    return dead_letters_of(store, sorted(system.services), status, getattr(args, "saga", None))


# -- the operator's actions: the CLI and the console (`choreo ui`) write the same events ---------

def retry_letters(url: str | None, letters: Iterable[DeadLetter], reason: str = "") -> list[str]:
    """Ask each letter's service to run it again (`request_retry`); return what was requested, a line each."""
    done = []
    with open_existing(url, write=True) as store:
        for d in letters:
            request_retry(store, d, reason)
            done.append(f"retry of {d.service}:{d.id} requested (saga {d.saga_id}); {d.service} carries it out")
    return done


def skip_letter(url: str | None, ref: str, reason: str) -> str:
    """Ask the service of dead letter `ref` (SERVICE:ID) to skip it (`request_skip`); return what was requested."""
    with open_existing(url) as reader:
        d = find_dead_letter(reader, ref)
    with open_existing(url, write=True) as store:
        request_skip(store, d, reason)
    return f"skip of {d.service}:{d.id} requested (saga {d.saga_id}); {d.service} carries it out"


def compensate_saga(url: str | None, saga_id: str, reason: str, sagas: Iterable[SagaDefinition] = ()) -> str:
    """Fail a running saga so that every participant compensates (`force_compensation`); return what was requested."""
    with open_existing(url, write=True) as store:
        event_id = force_compensation(store, saga_id, reason, sagas=sagas)
    return (f"compensation of saga {saga_id} requested (event {event_id}); the service that started it "
            "fails it, unless it ended first, and its participants compensate")


def _row(d: DeadLetter) -> dict[str, Any]:
    row = asdict(d)
    row["ref"] = f"{d.service}:{d.id}"
    row["first_failed_at"] = d.first_failed_at.isoformat()
    row["last_failed_at"] = d.last_failed_at.isoformat()
    return row


def _list(args: argparse.Namespace) -> int:
    with open_existing(args.store) as store:
        letters = _letters(store, args, None if args.status == "all" else args.status)
        others = {status: len(_letters(store, args, status)) for status in ("retrying", "failed", "unpublished")} \
            if args.status == "parked" else {}
    if args.json:
        print(json.dumps([_row(d) for d in letters], indent=2, sort_keys=True))
        return 0
    for d in letters:
        print(f"{d.service}:{d.id:<5} {d.status:<8} saga {d.saga_id or '-'}  {d.type or '?'}  "
              f"attempts {d.attempts}  {d.reason}")
    print(f"{len(letters)} dead letter(s)")
    notes = {"retrying": "waiting for their next attempt", "failed": "deadline(s) that failed",
             "unpublished": "event(s) the log refused to take"}
    for status, n in others.items():
        if n:
            print(f"and {n} {notes[status]} (see --status {status})")
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_existing(args.store) as store:
        print(json.dumps(_row(find_dead_letter(store, args.ref)), indent=2, sort_keys=True))
    return 0


def _retry(args: argparse.Namespace) -> int:
    if args.all == bool(args.ref):
        raise UsageError("choreo dlq retry: give SERVICE:ID or --all (not both)")
    with open_existing(args.store) as reader:
        if args.all:
            letters = _letters(reader, args, "parked")
            firsts = {(d.service, d.saga_id): d for d in reversed(letters)}  # the first parked of each saga
            targets = sorted(firsts.values(), key=lambda d: (d.service, d.id or 0))
        else:
            targets = [find_dead_letter(reader, args.ref)]
    if not targets:
        print("no parked event to retry")
        return 0
    for line in retry_letters(args.store, targets, args.reason):
        print(line)
    return 0


def _skip(args: argparse.Namespace) -> int:
    print(skip_letter(args.store, args.ref, args.reason))
    return 0


def _compensate(args: argparse.Namespace) -> int:
    system = system_of(args, None)
    print(compensate_saga(args.store, args.saga_id, args.reason, system.sagas if system else ()))
    return 0
