"""`choreo check`: the static checks of a system's wiring (`choreo.checks`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from choreo._cli_common import FAILED, OK, add_command, add_system_option, system_of
from choreo.checks import check


def add_check_commands(sub: Any) -> None:
    """Add `choreo check` to the command line's subparsers."""
    p = add_command(sub, "check", "check a system's wiring: steps without compensation, events nothing "
                                  "handles or emits, unreachable steps, deadlines never cancelled, ...")
    add_system_option(p, "to check")
    p.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    system = system_of(args, "choreo check")
    assert system is not None
    findings = check(system)
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    elif findings:
        for f in findings:
            print(f)
        print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}")
    else:
        print(f"{len(system.services)} services, {len(system.sagas)} saga definitions: no findings")
    return FAILED if findings else OK
