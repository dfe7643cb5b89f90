"""`choreo sagas list|show`, `choreo replay` and `choreo project`: the saga projection."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from choreo._cli_common import (
    UsageError, add_command, add_store_option, add_system_option, open_existing, seconds, system_of,
)
from choreo._render import render_mermaid, render_saga
from choreo.errors import ConcurrencyConflict
from choreo._saga_fold import NO_SAGA_COUNT, STATES
from choreo.projection import SagaFilter, SagaProjection
from choreo.saga import SagaDefinition
from choreo.store import EventStore, open_store

log = logging.getLogger("choreo")

_WHY = "whose saga definitions name the steps"


def add_saga_commands(sub: Any) -> None:
    """Add `choreo sagas ...`, `choreo replay` and `choreo project` to the command line's subparsers."""

    def projection_options(p: argparse.ArgumentParser) -> None:
        add_store_option(p)
        add_system_option(p, _WHY)
        p.add_argument("--stuck-after", type=seconds, default=300.0, metavar="SECONDS",
                       help="seconds without progress after which a saga counts as stuck (default: %(default)s)")
        p.add_argument("--no-update", action="store_true",
                       help="read the projection as stored: write and create nothing (it may lag the log)")
        p.add_argument("--json", action="store_true", help="print JSON")

    sagas = add_command(sub, "sagas", "query the saga projection")
    sagas_sub = sagas.add_subparsers(dest="sagas_command", required=True)
    ls = add_command(sagas_sub, "list", "list sagas")
    projection_options(ls)
    ls.add_argument("--state", choices=STATES, help="only sagas in this state")
    ls.add_argument("--type", help="only sagas of this saga type")
    ls.add_argument("--since", help="only sagas started at or after this ISO time")
    ls.add_argument("--until", help="only sagas started before this ISO time")
    ls.add_argument("--stuck-for", type=seconds, metavar="SECONDS", help="only sagas with no progress for this long")
    ls.add_argument("--limit", type=_positive, metavar="N", help="list at most N sagas (a page)")
    ls.add_argument("--after", metavar="SAGA_ID",
                    help="list the sagas after this one (the last saga id of the previous page)")
    ls.set_defaults(func=_list)
    show = add_command(sagas_sub, "show", "show one saga: summary, steps, timeline")
    projection_options(show)
    show.add_argument("saga_id")
    show.add_argument("--as-of", help="the saga as it stood at this log position or ISO time")
    show.add_argument("--mermaid", action="store_true", help="print a Mermaid sequence diagram")
    show.set_defaults(func=_show)

    replay = add_command(sub, "replay", "drop the saga projection and rebuild it from position 0")
    add_store_option(replay)
    add_system_option(replay, _WHY)
    replay.add_argument("--workers", type=_positive, default=1, metavar="N",
                        help="fold in N processes at once, each taking a share of the sagas (SQLite; default: 1)")
    replay.set_defaults(func=_replay)

    project = add_command(sub, "project", "keep the saga projection up to date until SIGINT/SIGTERM")
    add_store_option(project)
    add_system_option(project, _WHY)
    project.set_defaults(func=_project)


def _definitions(args: argparse.Namespace) -> tuple[SagaDefinition, ...]:
    system = system_of(args, "the system's saga definitions are needed to fold the log")
    assert system is not None
    return system.sagas


def _projection(args: argparse.Namespace, store: EventStore) -> SagaProjection:
    stuck = timedelta(seconds=args.stuck_after)
    if args.no_update:
        projection = SagaProjection(store, sagas=_definitions(args), stuck_after=stuck, read_only=True)
        if why := projection.outdated():
            print(f"choreo: warning: {why}; showing it as stored (--no-update)", file=sys.stderr)
        return projection
    projection = SagaProjection(store, sagas=_definitions(args), stuck_after=stuck)
    stored = projection.documents.meta().get("catalog")
    if stored is not None and stored != projection.meta["catalog"]:
        # a query never rebuilds what `choreo project` keeps for other definitions: it reads it as it is
        print(f"choreo: warning: {projection.outdated()}; showing it as stored (run `choreo replay` to rebuild "
              "it with these definitions)", file=sys.stderr)
        return SagaProjection(store, sagas=_definitions(args), stuck_after=stuck, read_only=True)
    progress = _CatchingUp(projection.documents.position())
    projection.update(progress)
    progress.finish()
    return projection


#: seconds a catch-up may take before a query that is not on a terminal reports its progress
PROGRESS_AFTER = 1.0


class _CatchingUp:
    """Progress of a query's catch-up on stderr: a bar on a terminal, else a line a second once it takes over
    `PROGRESS_AFTER` seconds (a quick catch-up prints nothing)."""

    def __init__(self, position: int) -> None:
        self.position = position  # where the projection stood in the log (its size hint counts from 0)
        self.started = self.shown = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def __call__(self, done: int, size: int | None) -> None:
        now = time.monotonic()
        of = f"/{max(done, size - self.position)}" if size else ""
        if self.tty:
            sys.stderr.write(f"\rchoreo: updating the saga projection: {done}{of} events")
            self.drawn = True
        elif now - self.started >= PROGRESS_AFTER and (now - self.shown >= 1.0 or self.shown == self.started):
            sys.stderr.write(f"choreo: updating the saga projection: {done}{of} events\n")
            self.shown = now
        sys.stderr.flush()

    def finish(self) -> None:
        """Clear the bar (the query's output follows)."""
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a whole number above 0: {text!r}")
    return n


def _open(args: argparse.Namespace) -> EventStore:
    return open_existing(args.store, write=not args.no_update)


def _list(args: argparse.Namespace) -> int:
    where = SagaFilter(
        state=args.state,
        saga_type=args.type,
        started_after=_time(args.since),
        started_before=_time(args.until),
        stuck_for=timedelta(seconds=args.stuck_for) if args.stuck_for is not None else None,
    )
    _definitions(args)  # a usage error before the store is opened
    with _open(args) as store:
        projection = _projection(args, store)
        try:
            # one more than the page, to tell whether there is a next one
            sagas = projection.list(where, limit=args.limit + 1 if args.limit else None, after=args.after)
        except KeyError:
            print(f"choreo: --after: no saga {args.after!r} in {args.store or 'the store'}", file=sys.stderr)
            return 1
    more = args.limit is not None and len(sagas) > args.limit
    sagas = sagas[: args.limit]
    if args.json:
        print(json.dumps(sagas, indent=2, sort_keys=True))
        return 0
    for s in sagas:
        print(f"{s['saga_id']}  {s['saga_type'] or '-':<18} {s['state']:<13} {s['started_at']}  {s['cause'] or ''}")
    print(f"{len(sagas)} saga(s)" + (f"; more after them: --after {sagas[-1]['saga_id']}" if more else ""))
    return 0


def _show(args: argparse.Namespace) -> int:
    as_of: int | datetime | None = None
    if args.as_of is not None:
        as_of = int(args.as_of) if args.as_of.isdigit() else _time(args.as_of)
    _definitions(args)
    with _open(args) as store:
        saga = _projection(args, store).get(args.saga_id, as_of=as_of)
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
    definitions = _definitions(args)

    def progress(done: int, size: int | None) -> None:
        width = 40
        if size:
            filled = width * min(done, size) // size
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{size} events")
        else:
            sys.stderr.write(f"\r{done} events")
        sys.stderr.flush()

    bar = sys.stderr.isatty()
    with open_existing(args.store, write=True) as store:
        projection = SagaProjection(store, sagas=definitions, workers=args.workers)
        count = projection.replay(progress if bar else None)
        if bar:
            sys.stderr.write("\n")
        sagas = sum(n for state, n in projection.counts().items() if state != NO_SAGA_COUNT)
        print(f"replayed {count} events into {sagas} sagas")
        projection.close()
    return 0


def _project(args: argparse.Namespace) -> int:
    definitions = _definitions(args)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    store = open_store(args.store)  # a long-running reader, like `choreo run`: it may start before the services
    projection = SagaProjection(store, sagas=definitions)
    try:
        while not stop.is_set():
            try:
                idle = projection.update() == 0
            except ConcurrencyConflict as e:  # another process rebuilt it with other definitions
                log.warning("projection: %s; trying again", e)
                idle = True
            if idle:
                stop.wait(0.05)
    finally:
        projection.close()
        store.close()
    return 0


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"not a position or ISO time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
