"""`choreo ui`: serve the web console (choreo.ui) with uvicorn.

Security: the console binds to 127.0.0.1 by default and then answers only requests for a
loopback host name. Actions that write need the token (`--token` or `$CHOREO_UI_TOKEN`);
without one the console is read-only. Bound to any other address, it refuses to start
without a token unless `--read-only` says that a console nobody can act from is meant.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from datetime import timedelta
from typing import Any

from choreo._cli_common import UsageError, add_command, add_store_option, add_system_option, non_negative_int, \
    open_existing, seconds, system_of

DEFAULT_PORT = 8765


def add_ui_command(sub: Any) -> None:
    """Add `choreo ui` to the command line's subparsers."""
    ui = add_command(sub, "ui", "serve the web console: sagas, dead letters, the system's flow")
    add_store_option(ui)
    add_system_option(ui, "whose sagas, services and handlers the console shows")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: %(default)s; another address needs --token or --read-only)")
    ui.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT, help="(default: %(default)s)")
    ui.add_argument("--token", default=None,
                    help="the secret that actions (retry, skip, compensate) need (default: $CHOREO_UI_TOKEN; "
                         "without one the console is read-only)")
    ui.add_argument("--read-only", action="store_true", help="refuse every action even with a token")
    ui.add_argument("--stuck-after", type=seconds, default=300.0, metavar="SECONDS",
                    help="seconds without progress after which a saga counts as stuck (default: %(default)s)")
    ui.set_defaults(func=_ui)


def is_loopback(host: str) -> bool:
    """Whether `host` names the loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ui(args: argparse.Namespace) -> int:
    token = None if args.read_only else (args.token or os.environ.get("CHOREO_UI_TOKEN") or None)
    loopback = is_loopback(args.host)
    if not loopback and token is None and not args.read_only:
        raise UsageError(f"--host {args.host} is not a loopback address: give --token (or set $CHOREO_UI_TOKEN) "
                         "so that only its holders can act, or --read-only for a console nobody can act from")
    system = system_of(args, "the console shows the sagas, services and handlers of a system")
    assert system is not None
    try:
        import uvicorn

        from choreo.ui import create_app
    except ImportError as e:
        raise UsageError(f"choreo ui needs the optional extra: pip install 'choreo[ui]' ({e})") from None
    store = open_existing(args.store)  # read-only: a missing store is StoreNotFound, nothing is created
    from choreo.ui.app import LOOPBACK_HOSTS

    app = create_app(args.store, system, token=token, stuck_after=timedelta(seconds=args.stuck_after),
                     allowed_hosts=LOOPBACK_HOSTS if loopback else None, store=store)
    mode = "actions need the token" if token else "read-only"
    print(f"choreo ui: http://{args.host}:{args.port} on {store.url} ({mode})", file=sys.stderr, flush=True)
    level = "info" if getattr(args, "verbose", False) else "warning"
    uvicorn.run(app, host=args.host, port=args.port, log_level=level)
    return 0
