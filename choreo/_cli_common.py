"""What every `choreo` command shares: exit codes, usage errors, options, targets and stores.

Exit codes (README, "Exit codes"): 0 ok; 1 not found, refused or a check failed; 2 usage
(a bad option, a target that cannot be loaded, a missing `--system`); 3 the store is
unreachable or unusable; 130 interrupted; 141 the reader of the output went away.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Any, TypeVar

from choreo.errors import ChoreoError, LogRewound, StoreError, StoreNotFound, StoreURLError, WiringError
from choreo.operations import CommandRefused
from choreo.store import EventStore, open_store
from choreo.system import System

OK, FAILED, USAGE, UNAVAILABLE, INTERRUPTED, BROKEN_PIPE = 0, 1, 2, 3, 130, 141
STORE_HELP = "store URL (default: $CHOREO_STORE or sqlite:///choreo.db)"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
T = TypeVar("T")


class UsageError(ChoreoError, ValueError):
    """The command line asks for something that cannot be done as given (exit 2)."""


def exit_code(error: ChoreoError) -> int:
    """The exit code that reports `error`."""
    if isinstance(error, StoreNotFound):
        return FAILED
    if isinstance(error, StoreURLError):
        return USAGE
    if isinstance(error, (StoreError, LogRewound)):
        return UNAVAILABLE
    if isinstance(error, (LookupError, CommandRefused)):
        return FAILED
    if isinstance(error, (UsageError, WiringError, ValueError)):
        return USAGE
    return FAILED


# -- argument types: a bad value is a usage error that names the option ------------------------

def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    return _whole(text, 0)


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds, more than 0."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def text(value: str) -> str:
    """Text that is not empty."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def dead_letter_ref(value: str) -> str:
    """`SERVICE:ID`, as `choreo dlq list` prints it."""
    service, _, number = value.partition(":")
    if not service or not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected SERVICE:ID (e.g. payment:3), got {value!r}")
    return value


def log_level(value: str) -> str:
    """A logging level name, in any case."""
    if value.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LEVELS)}, got {value!r}")
    return value.upper()


# -- parsers --------------------------------------------------------------------------------------

def add_log_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """`-v` and `--log-level`, accepted before and after a subcommand (a subcommand's copy keeps
    the value given before it unless it is given again)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="log what the services do (INFO)")
    parser.add_argument("--log-level", type=log_level, metavar="LEVEL", default=None if top else argparse.SUPPRESS,
                        help=f"log from this level on ({', '.join(LEVELS)}; default: WARNING)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text" if top else argparse.SUPPRESS,
                        help="text lines, or one JSON object a line with the fields service, saga_id and "
                             "event_id (default: text)")


def add_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the log options."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    add_log_options(parser)
    return parser


def add_store_option(parser: argparse.ArgumentParser) -> None:
    """`--store URL`."""
    parser.add_argument("--store", default=None, metavar="URL", help=STORE_HELP)


def add_system_option(parser: argparse.ArgumentParser, why: str) -> None:
    """`--system MODULE:SYSTEM` (or `$CHOREO_SYSTEM`)."""
    parser.add_argument("--system", default=None, metavar="MODULE:SYSTEM",
                        help=f"the system {why} (default: $CHOREO_SYSTEM)")


# -- targets and stores ---------------------------------------------------------------------------

def system_of(args: argparse.Namespace, needed_for: str | None) -> System | None:
    """The system named by `--system` or `$CHOREO_SYSTEM`; a usage error if `needed_for` and neither is set."""
    target = args.system or os.environ.get("CHOREO_SYSTEM")
    if not target:
        if needed_for is None:
            return None
        raise UsageError(f"{needed_for}: give --system MODULE:SYSTEM or set $CHOREO_SYSTEM")
    system: System = load(target, System)
    return system


def load(target: str, kind: type[T]) -> T:
    """Import `MODULE:NAME` (the current directory first, as uvicorn does) and return that `kind`."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected MODULE:NAME (e.g. services.payment:service), got {target!r}")
    cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the module's own code raised: one line, not a traceback
        raise UsageError(f"cannot import module {module_name!r}: it raised {type(e).__name__}: {e}") from e
    obj = getattr(module, attr, None)
    if not isinstance(obj, kind):
        raise UsageError(f"{target!r} is not a choreo {kind.__name__} (found {type(obj).__name__})")
    return obj


def cwd_on_path() -> None:
    """Put the current directory first on `sys.path` (the `choreo` script's own folder is there instead)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def open_existing(url: str | None, *, write: bool = False) -> EventStore:
    """Open a store that exists: `StoreNotFound`, creating nothing, if it does not.

    Read-only unless `write`: then the store is checked read-only first, and opened again to write.
    """
    store = open_store(url, create=False)
    if not write:
        return store
    store.close()
    return open_store(url)
