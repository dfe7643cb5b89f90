"""A tiny service for the replica tests: `echo` answers each `EchoPing` of a saga with an `EchoPong`
that names the process (and, in one process, the replica) that handled it.

    python -m choreo run tests.replica_system:echo --store sqlite:///x.db --lease 1

A saga is a run of pings numbered 0, 1, 2...: its pongs, read in log order, show whether
one replica handled the saga, in order, each ping once. A ping with `flaky` fails with a
`TimeoutError` on its first attempt in a process, so it is retried later (a dead letter
`retrying` of its saga). With `$ECHO_DELAY` (seconds), each answer first waits that long,
as a handler that calls another system does (the replica benchmark).
"""

from __future__ import annotations

import os
from datetime import timedelta
import time
from collections.abc import Callable
from uuid import uuid4

from choreo import Context, Envelope, EventStore, RetryPolicy, Service
from choreo import clock
from choreo.events import Event, encode_payload

SEGMENTS = 8

echo = Service("echo", segments=SEGMENTS,
               retry=RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, retry_on=(TimeoutError,)))

#: in-process tests set this to the replica whose poll runs (several replicas in one process)
current_replica = ""
#: (replica, saga id, n) of every ping handled in this process, attempts that failed included
handled: list[tuple[str, str, int]] = []
_failed_once: set[tuple[str, int]] = set()
_DELAY = float(os.environ.get("ECHO_DELAY", "0"))
#: called with the saga id before each ping is handled (a test's way into the middle of a batch)
before_handling: Callable[[str], None] | None = None


class EchoPing(Event):
    n: int
    flaky: bool = False


class EchoPong(Event):
    n: int
    pid: int
    replica: str


@echo.on(EchoPing)
def pong(event: EchoPing, ctx: Context) -> EchoPong:
    """Answer a ping (a flaky one fails its first attempt in this process)."""
    saga_id = ctx.saga_id
    handled.append((current_replica, saga_id, event.n))
    if before_handling is not None:
        before_handling(saga_id)
    if _DELAY:
        time.sleep(_DELAY)
    if event.flaky and (saga_id, event.n) not in _failed_once:
        _failed_once.add((saga_id, event.n))
        raise TimeoutError(f"ping {event.n} of {saga_id} times out once")
    return EchoPong(n=event.n, pid=os.getpid(), replica=current_replica)


def ping(saga_id: str, n: int, *, flaky: bool = False) -> Envelope:
    """The envelope of ping `n` of a saga, to append to the log."""
    event = EchoPing(n=n, flaky=flaky)
    return Envelope(event_id=str(uuid4()), type=event.event_type, version=event.schema_version, saga_id=saga_id,
                    causation_id=None, service="driver", step=None, outcome=None, occurred_at=clock.now(),
                    payload=encode_payload(event))


def pongs(store: EventStore) -> dict[str, list[EchoPong]]:
    """Every saga's pongs, in log order."""
    out: dict[str, list[EchoPong]] = {}
    for batch in store.scan():
        for env in batch:
            if env.type == EchoPong.event_type:
                out.setdefault(env.saga_id, []).append(env.decode())  # type: ignore[arg-type]
    return out


#: a service with a deadline per saga: 5 s (choreo's clock) after a saga's first ping, `EchoLate`
timer = Service("timer", segments=SEGMENTS)


class EchoLate(Event):
    replica: str


@timer.deadline("late", start_on=EchoPing, after=timedelta(seconds=5), fails_saga=False)
def late(event: EchoPing, ctx: Context) -> EchoLate:
    """Say that the saga is late (naming the replica that fired the deadline)."""
    handled.append((current_replica, ctx.saga_id, -1))
    return EchoLate(replica=current_replica)
