"""The one clock that every timestamp and deadline in choreo comes from.

The default `SystemClock` reads `datetime.now(timezone.utc)` on every call, so
freezegun drives it. `ManualClock` is a virtual clock for tests that move time
by hand. `use_clock()` installs a clock for the whole process (aggregates take
their event timestamps from it too).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    """Anything with a `now()` that returns an aware UTC datetime."""

    def now(self) -> datetime:
        """Return the current time."""
        ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        """Return the current UTC time."""
        return datetime.now(timezone.utc)


class ManualClock:
    """A virtual clock that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=timezone.utc)

    def now(self) -> datetime:
        """Return the virtual time."""
        return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        """Move the clock forward by a timedelta or a number of seconds."""
        self._now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        return self._now


_active: Clock = SystemClock()


def use_clock(clock: Clock) -> Clock:
    """Make `clock` the process-wide clock; return the previous one."""
    global _active
    previous, _active = _active, clock
    return previous


def now() -> datetime:
    """Return the current time from the process-wide clock, as a plain `datetime`."""
    t = _active.now()
    if type(t).__module__ != "datetime":  # a test double such as freezegun's FakeDatetime
        real = next(c for c in type(t).__mro__ if c.__module__ == "datetime" and c.__name__ == "datetime")
        t = real(t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond, t.tzinfo)
    return t
