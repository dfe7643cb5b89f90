"""Which partitions of the topic a replica of a service owns, checked inside each of its commits.

Replicas of a service are one Kafka consumer group and share one state store. When the
group gives a replica a partition, the replica claims it in that store: it writes the
partition's owner mark, a tracking entry `owner:TOPIC:P` whose value is
`generation << 32`, one generation above the last claim. Every commit of the replica that
touches the partition (its position, a dead letter or deadline of one of its sagas)
writes the mark again as `generation << 32 | n`, n counting its commits. Tracking only
moves forward, in the commit's transaction: once another replica claimed the partition
(a higher generation), a commit of the replica that lost it is refused and writes
nothing. That is the whole fence: it uses the tracking contract every `ServiceStore`
keeps, so it holds on each state store (SQLite, PostgreSQL) alike.

Plain Python; no kafka-python.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from choreo.errors import ConcurrencyConflict, PartitionLost
from choreo.store import ServiceStore, Tracking

#: the prefix of the tracking sources that hold the owner marks
OWNER = "owner:"
_SHIFT = 32
#: how many times a claim reads and writes the marks again when another claim got there first
_CLAIM_ATTEMPTS = 10


class Ownership:
    """The partitions a replica owns, each with the generation it claimed it at."""

    def __init__(self, inner: ServiceStore, service: str, topic: str) -> None:
        self.inner = inner
        self.service = service
        self.topic = topic
        #: whether the replica is in a consumer group: from then on each commit is checked
        self.active = False
        self.owned: dict[int, int] = {}  # partition -> generation
        self._count: dict[int, int] = {}  # partition -> commits since the claim
        self._lock = threading.Lock()

    def key(self, partition: int) -> str:
        """The tracking source of a partition's owner mark."""
        return f"{OWNER}{self.topic}:{partition}"

    def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        """Claim partitions the group gave this replica; return the generation of each.

        Written in one transaction; from then on a replica that held them before cannot commit for them.
        """
        partitions = sorted(set(partitions))
        self.active = True
        if not partitions:
            return {}
        for _ in range(_CLAIM_ATTEMPTS):
            stored = self.inner.tracking()
            claims = {p: (stored.get(self.key(p), 0) >> _SHIFT) + 1 for p in partitions}
            try:
                self.inner.commit(events=[], emitted=[], tracking={self.key(p): g << _SHIFT for p, g in claims.items()})
            except ConcurrencyConflict:
                continue  # another replica claimed one of them meanwhile: the latest assignment wins
            with self._lock:
                self.owned.update(claims)
                self._count.update(dict.fromkeys(claims, 0))
            return claims
        raise ConcurrencyConflict(
            f"{self.service}: could not claim partitions {partitions} of topic {self.topic!r}: other replicas "
            f"kept claiming them ({_CLAIM_ATTEMPTS} attempts)"
        )

    def release(self, partitions: Iterable[int]) -> None:
        """Forget partitions the group took away (the next owner's claim fences them)."""
        with self._lock:
            for p in partitions:
                self.owned.pop(p, None)
                self._count.pop(p, None)

    def marks(self, partitions: Iterable[int]) -> Tracking:
        """The owner marks a commit touching `partitions` writes; `PartitionLost` if one is not owned.

        Empty while the replica is in no consumer group (one process, tests, tools).
        """
        if not self.active:
            return {}
        partitions = set(partitions)
        with self._lock:
            lost = sorted(partitions - set(self.owned))
            if lost:
                raise PartitionLost(
                    f"{self.service}: this replica does not own partition(s) {lost} of topic {self.topic!r} "
                    "(the consumer group gave them to another replica): its commit was refused and nothing "
                    "was written"
                )
            marks = {}
            for p in partitions:
                self._count[p] += 1
                marks[self.key(p)] = (self.owned[p] << _SHIFT) | self._count[p]
            return marks

    def taken(self, partitions: Iterable[int]) -> PartitionLost | None:
        """After a refused commit: the error to raise if another replica claimed one of `partitions` since."""
        stored = self.inner.tracking()
        with self._lock:
            taken = {p: stored.get(self.key(p), 0) >> _SHIFT for p in partitions if p in self.owned}
            taken = {p: g for p, g in taken.items() if g != self.owned[p]}
            mine = {p: self.owned.pop(p) for p in taken}
        if not taken:
            return None
        detail = ", ".join(f"{p} (claimed at generation {g}; this replica held {mine[p]})" for p, g in taken.items())
        return PartitionLost(
            f"{self.service}: another replica now owns partition(s) {detail} of topic {self.topic!r}: this "
            "replica's commit was refused and nothing was written; it goes on with the partitions it still owns"
        )


def without_marks(tracking: Tracking) -> Tracking:
    """A tracking without the owner marks (only the positions in the log)."""
    return {source: position for source, position in tracking.items() if not source.startswith(OWNER)}
