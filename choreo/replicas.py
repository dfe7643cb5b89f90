"""Replicas of one service that share its work: segments of the sagas, claimed with leases.

A service's sagas are split into N segments by a stable hash of the saga id
(`segment_of`). A replica claims segments in the service's store with a lease that
it renews while it runs; a lease that ran out (its replica died or stalled) can be
taken by another replica, and a replica that sees others join releases segments down
to its fair share. Each segment keeps its own tracking position, so a segment that
moves resumes exactly where its last commit left it. Every commit of a replica names
the segments it holds and their tokens, and the store checks them in the commit's
transaction: a replica that lost a segment can never commit for it (`ClaimLost`).
The processor uses this through `Replica`; docs/scaling.md ("Replicas") explains the whole.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import uuid4

from choreo.errors import WiringError
from choreo.store import Held, ServiceStore, segment_source

log = logging.getLogger("choreo")

#: segments of a service whose `Service(segments=...)` does not say
DEFAULT_SEGMENTS = 16


def segment_of(saga_id: str, segments: int) -> int:
    """The segment (0 to `segments` - 1) that a saga belongs to: CRC-32 of its id, modulo `segments`."""
    return zlib.crc32(saga_id.encode("utf-8", "replace")) % segments


@dataclass(frozen=True)
class ReplicaSettings:
    """How a process runs as one replica of its service (see docs/scaling.md, "Replicas")."""

    #: how many segments the service's work is split into (fixed for the service's life)
    segments: int = DEFAULT_SEGMENTS
    #: seconds a claim lasts unless renewed (renewed every third of it): the failover time after a crash
    lease: float = 10.0
    #: take at once the segments of a replica that died on this host (its process is gone), not after its lease
    reap_local: bool = True
    #: a readable name for this replica (its id adds host, process and a random part, so ids never collide)
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.segments, int) or not 1 <= self.segments <= 4096:
            raise WiringError(f"segments must be a whole number from 1 to 4096, got {self.segments!r}")
        if not isinstance(self.lease, (int, float)) or not self.lease > 0:
            raise WiringError(f"the lease must be a positive number of seconds, got {self.lease!r}")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "-"


def new_replica_id(name: str = "") -> str:
    """A replica id that no other replica has: `NAME@HOST:PIDNS:PID#RANDOM`."""
    return f"{name}@{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}#{uuid4().hex[:8]}"


def died_here(owner: str) -> bool:
    """Whether `owner` is a replica id of this host (and PID namespace) whose process is gone."""
    try:
        where = owner.rsplit("@", 1)[1].split("#", 1)[0]
        host, ns, pid = where.rsplit(":", 2)
        number = int(pid)
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname() or ns != _pid_namespace() or ns == "-" or number == os.getpid():
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        with open(f"/proc/{number}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


class Replica:
    """One replica's claims on its service's segments: which it holds, renewing and rebalancing them."""

    def __init__(self, own: ServiceStore, settings: ReplicaSettings) -> None:
        self.own = own
        self.settings = settings
        self.segments = settings.segments
        self.lease = float(settings.lease)
        self.id = new_replica_id(settings.name)
        #: the segments this replica holds, with their tokens (as of its last tick)
        self.tokens: dict[int, int] = {}
        #: whether other replicas were alive at the last tick (then shared aggregates may change under us)
        self.shared = False
        self._next = 0.0  # when the next tick is due (monotonic clock)
        self._ticked = False  # the first tick's segments are told by the service's start line
        self._changed = False  # a renewal found the held segments changed (see tick_if_due)
        own.claims(self.segments)  # records the layout, or raises SegmentsMismatch

    def owns(self, saga_id: str) -> bool:
        """Whether this replica handles the saga (it holds the saga's segment)."""
        return zlib.crc32(saga_id.encode("utf-8", "replace")) % self.segments in self.tokens

    def key(self, source: str, saga_id: str) -> str:
        """The tracking key of the saga's segment in `source`."""
        return segment_source(source, segment_of(saga_id, self.segments))

    def held(self) -> Held:
        """What a commit made now is checked against."""
        return Held(self.id, dict(self.tokens))

    def due(self) -> bool:
        """Whether it is time to renew the claims (every third of the lease)."""
        return time.monotonic() >= self._next

    def expire(self) -> None:
        """Make the next `tick_if_due()` tick (after a commit found a claim lost)."""
        self._next = 0.0

    def tick_if_due(self) -> bool:
        """Renew and rebalance if it is time; return whether the held segments (or tokens) changed
        since the last call (a renewal in the middle of a batch may have found one lost)."""
        changed = self.tick() if self.due() else False
        changed, self._changed = changed or self._changed, False
        return changed

    def tick(self) -> bool:
        """Renew this replica's claims, release down to its fair share, take free or expired segments up to it.

        Returns whether the segments it holds (or their tokens) changed.
        """
        self._next = time.monotonic() + self.lease / 3
        state = self.own.claims(self.segments)
        others = {c.owner for c in state.claims if c.owner} | set(state.replicas)
        dead = sorted(o for o in others - {self.id} if died_here(o)) if self.settings.reap_local else []
        alive = sorted((set(state.replicas) - set(dead)) | {self.id})
        # a fair share: N // k each, one more for the first N % k replicas by id (the shares add up to N)
        base, extra = divmod(self.segments, len(alive))
        fair = base + (alive.index(self.id) < extra)
        mine = [c.segment for c in state.claims if c.owner == self.id]
        free = [c.segment for c in state.claims
                if c.owner != self.id and (c.owner is None or c.expires_at < state.now or c.owner in dead)]
        random.shuffle(free)  # replicas taking free segments at once mostly want different ones
        keep, release = mine[:fair], mine[fair:]
        take = free[: max(0, fair - len(keep))]
        before = self.tokens
        self.tokens = self.own.acquire(self.id, keep + take, self.lease, release=release, dead=dead)
        self.shared = len(alive) > 1
        if self.tokens != before and self._ticked:  # (the first is in the service's start line)
            log.info("%s: replica %s holds %d of %d segments (%d replicas alive)%s", self.own.name, self.id,
                     len(self.tokens), self.segments, len(alive),
                     f"; took over from {', '.join(dead)}" if dead else "")
        self._ticked = True
        return self.tokens != before

    def renew(self) -> None:
        """Renew the claims held, taking and releasing nothing (in the middle of a batch)."""
        self._next = time.monotonic() + self.lease / 3
        before, self.tokens = self.tokens, self.own.acquire(self.id, list(self.tokens), self.lease)
        if self.tokens != before:  # lost (or lost and taken back): the processor must read its state again
            self._changed = True
            log.info("%s: replica %s holds %d of %d segments (found at a renewal)", self.own.name, self.id,
                     len(self.tokens), self.segments)

    def leave(self) -> None:
        """Free every segment at once, so that the others take them without waiting for the lease."""
        self.own.leave(self.id)
        self.tokens = {}

    def reached(self, source: str, position: int, tracking: Mapping[str, int]) -> dict[str, int]:
        """The tracking a commit moves: each held segment of `source` not yet at `position`."""
        keys = (segment_source(source, s) for s in self.tokens)
        return {k: position for k in keys if position > tracking.get(k, 0)}

    def start(self, source: str, tracking: Mapping[str, int]) -> int:
        """Where to read `source` from: the least position of the held segments."""
        return min((tracking.get(segment_source(source, s), 0) for s in self.tokens), default=0)
