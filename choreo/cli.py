"""The `choreo` command line.

Each group of commands lives in its own module: `choreo._run_cli` (run, demo),
`choreo._sagas_cli` (sagas, replay, project), `choreo._dlq_cli` (dlq), `choreo._ui_cli` (ui),
`choreo._check_cli` (check); what they share is
in `choreo._cli_common`, with the exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from choreo._cli_common import BROKEN_PIPE, INTERRUPTED, add_log_options, exit_code
from choreo._check_cli import add_check_commands
from choreo._dlq_cli import add_dlq_commands
from choreo._run_cli import add_run_commands, load_service
from choreo._sagas_cli import add_saga_commands
from choreo._ui_cli import add_ui_command
from choreo.errors import ChoreoError
from choreo.logs import JsonFormatter

__all__ = ["build_parser", "load_service", "main"]


def _version() -> str:
    try:
        return version("choreo")
    except PackageNotFoundError:  # run from a source tree that is not installed
        import choreo

        return choreo.__version__


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the `choreo` command."""
    parser = argparse.ArgumentParser(
        prog="choreo",
        description="Choreography-based, event-sourced sagas.",
        epilog="Exit codes: 0 ok; 1 not found, refused or a check failed; 2 usage; "
               "3 store unreachable or unusable; 130 interrupted; 141 output pipe closed.",
    )
    parser.add_argument("--version", action="version", version=f"choreo {_version()}")
    add_log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)
    add_saga_commands(sub)
    add_dlq_commands(sub)
    add_ui_command(sub)
    add_check_commands(sub)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = args.log_level or ("INFO" if args.verbose else "WARNING")
    if args.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # kafka-python logs every failed connection attempt; choreo reports what matters itself
    loud = logging.getLevelName(level) <= logging.INFO
    logging.getLogger("kafka").setLevel(level if loud else logging.CRITICAL)


def _quiet_stdout() -> None:
    """After the reader of stdout went away: send what is left to /dev/null, so exiting prints nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `choreo` command; return its exit code (see README, "Exit codes")."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except ChoreoError as e:
        command = " ".join(["choreo", args.command, *[getattr(args, f"{args.command}_command", None) or ""]]).strip()
        print(f"{command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:  # `choreo sagas list | head`: the reader has what it wanted
        _quiet_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        return INTERRUPTED
