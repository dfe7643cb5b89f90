"""A service's own store on Kafka, and the relay that publishes its outbox.

The service's state store (its SQLite file `STATE/svc-NAME.db`, or the store that
`state=URL` names) holds its aggregates, tracking, handled ids, dead letters and
deadlines, and, in its log, the outbox: every event the service emitted, written in the
handler's transaction. In a consumer group a replica commits only for the partitions it
owns (`choreo.stores._kafka_owner`), and publishes the outbox of those partitions only
(an event's partition is its saga's); outside a group it publishes all of it. `flush()`
publishes in order and marks, per partition in the relay's own tracking, how far the
broker acknowledged it:

- when a send fails, the acknowledged prefix is marked before the error is raised,
  so the next flush starts after it; records the broker acknowledged beyond the
  first failed one are remembered too (`ahead`), so nothing acknowledged is sent
  again. Only a crash between the acknowledgement and the mark sends a copy, which
  consumers skip by its event id.
- a record the producer or broker refuses for good (too large, invalid) becomes a
  dead letter of the service with status `unpublished` and the broker's reason, and
  the relay moves past it: the event stays in the outbox, and the rest flows.

This module does not import kafka-python; `KafkaStore.deliver()` does the sending.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from choreo import clock
from choreo.deadlines import Deadline
from choreo.errors import ConcurrencyConflict, StoreError
from choreo.events import Envelope
from choreo.store import LOG, DeadLetter, ServiceStore, Tracking
from choreo.stores._kafka_owner import Ownership, without_marks

if TYPE_CHECKING:
    from collections.abc import Mapping

    from choreo.stores.kafka import KafkaStore

log = logging.getLogger("choreo.stores.kafka")

#: the status of a dead letter for an emitted event Kafka refused to take
UNPUBLISHED = "unpublished"
#: how many outbox events the relay sends at a time
_BATCH = 1000
#: the relay's documents listing positions acknowledged after its tracking (after a failed send): `ahead-P`
_AHEAD = "ahead"
#: a replica reads this many times more due retries or deadlines than it fires (the rest are others')
_OTHERS = 8


class _KafkaServiceStore(ServiceStore):
    """A service's own state store; its log is the outbox, published by `flush()`."""

    def __init__(self, kafka: KafkaStore, name: str) -> None:
        self.kafka = kafka
        self.name = name
        #: the outbox (the state store's log), the relay's marks, and whether other services' outboxes share the log
        self.local, self.relay, self.shared = kafka.state_of(name)
        self.inner = self.local.service(name)
        self.owner = Ownership(self.inner, name, kafka.topic)
        #: the replica's group feed, once it has one: told each committed position (advisory offsets)
        self.feed: Any = None
        self._unsent = True  # unknown until the first flush looks
        #: the relay's marks by partition, read when first needed: (position, positions acknowledged after it)
        self._marks: dict[int, tuple[int, set[int]]] = {}

    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        return self.inner.load(aggregate_id)

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list[StoredEvent]]:
        return self.inner.load_many(aggregate_ids)

    def load_latest(self, aggregate_id: UUID) -> tuple[StoredEvent | None, list[StoredEvent]]:
        return self.inner.load_latest(aggregate_id)

    def tracking(self) -> Tracking:
        return without_marks(self.inner.tracking())

    def set_tracking(self, tracking: Mapping[str, int]) -> None:
        self.inner.set_tracking(tracking)

    def seen(self, event_ids: Sequence[str]) -> set[str]:
        return self.inner.seen(event_ids)

    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        return self.inner.dead_letters(status)

    def due_retries(self, now: datetime, limit: int = 100) -> list[DeadLetter]:
        """The due retries of the sagas in this replica's partitions (all of them outside a group)."""
        if not self.owner.active:
            return self.inner.due_retries(now, limit)
        due = self.inner.due_retries(now, limit * _OTHERS)
        return [d for d in due if self._partition_of_letter(d) in self.owner.owned][:limit]

    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        """The due deadlines of the sagas in this replica's partitions (all of them outside a group)."""
        if not self.owner.active:
            return self.inner.due_deadlines(now, limit)
        due = self.inner.due_deadlines(now, limit * _OTHERS)
        return [d for d in due if self.kafka.partition_of(d.saga_id) in self.owner.owned][:limit]

    def commit(self, **changes: Any) -> None:
        """Commit as the state store does; in a consumer group, only for partitions this replica owns.

        Raises `PartitionLost`, writing nothing, for a partition that another replica claimed.
        """
        tracking = dict(changes.get("tracking") or {})
        touched = self._touched(changes) if self.owner.active else set()
        marks = self.owner.marks(touched)
        try:
            self.inner.commit(**{**changes, "tracking": {**tracking, **marks}})
        except ConcurrencyConflict as e:
            if marks and (lost := self.owner.taken(touched)) is not None:
                raise lost from e
            raise
        if self.feed is not None and tracking:
            self.feed.advise(tracking)
        if changes.get("emitted"):
            self._unsent = True
            try:  # the commit is durable: a broker that does not answer now only delays the relay
                self.flush()
            except StoreError as e:
                log.warning("%s: committed; publishing waits for Kafka: %s", self.name, e)
            except ConcurrencyConflict as e:  # another replica's relay marked a partition: the next flush reads again
                log.warning("%s: committed; publishing waits: %s", self.name, e)

    def claim(self, partitions: Iterable[int]) -> None:
        """Claim partitions the group gave this replica (see `Ownership`); the relay looks at their outbox."""
        claimed = self.owner.claim(partitions)
        for p in claimed:
            self._marks.pop(p, None)  # another replica's relay may have moved them
        self._unsent = True

    def release(self, partitions: Iterable[int]) -> None:
        """Forget partitions the group took away."""
        partitions = list(partitions)
        self.owner.release(partitions)
        for p in partitions:
            self._marks.pop(p, None)

    def _partition_in(self, source: str | None) -> int | None:
        topic, _, number = (source or "").rpartition(":")
        return int(number) if topic == self.kafka.topic and number.isdigit() else None

    def _partition_of_letter(self, letter: DeadLetter) -> int:
        found = self._partition_in(letter.envelope.get("source"))
        return self.kafka.partition_of(letter.saga_id) if found is None else found

    def _touched(self, changes: Mapping[str, Any]) -> set[int]:
        """The partitions a commit writes for: its positions, and the sagas of its dead letters and deadlines."""
        touched = {p for source in changes.get("tracking") or {} if (p := self._partition_in(source)) is not None}
        touched.update(self._partition_of_letter(d) for d in (*changes.get("parked", ()), *changes.get("updated", ())))
        touched.update(self.kafka.partition_of(d.saga_id) for d in changes.get("deadlines", ()))
        return touched

    def oversized(self, env: Envelope) -> str | None:
        """Why the topic cannot take `env` (its Kafka record is over `max_event_bytes`), or None."""
        return self.kafka.oversized(env)

    # -- the relay ---------------------------------------------------------------------------
    def _relayed(self) -> set[int]:
        """The partitions whose outbox this process publishes: those it owns in a group, else all."""
        return set(self.owner.owned) if self.owner.active else set(range(self.kafka.partition_count()))

    def _load_marks(self, partitions: Iterable[int]) -> dict[int, tuple[int, set[int]]]:
        """The relay's marks of `partitions`: cached, or read (a position `log` and a document `ahead`, from
        before the marks were kept by partition, count for every partition)."""
        missing = [p for p in partitions if p not in self._marks]
        if missing:
            tracked = self.relay.tracking()
            docs = self.relay.get_many([_AHEAD, *(f"{_AHEAD}-{p}" for p in missing)])
            legacy = {int(x) for x in (docs.get(_AHEAD) or {}).get("positions", [])}
            for p in missing:
                position = max(tracked.get(LOG, 0), tracked.get(self._source(p), 0))
                ahead = legacy | {int(x) for x in (docs.get(f"{_AHEAD}-{p}") or {}).get("positions", [])}
                self._marks[p] = (position, {x for x in ahead if x > position})
        return {p: self._marks[p] for p in partitions}

    def _source(self, partition: int) -> str:
        return f"{self.kafka.topic}:{partition}"

    def _mine(self, env: Envelope) -> bool:
        return not self.shared or env.service == self.name

    def flush(self) -> None:
        """Publish the outbox of this replica's partitions in order; mark what the broker acknowledged, set
        aside what it refuses.

        Raises `StoreError` if the broker did not take an event (after marking what it took
        before it); the next flush starts from that event.
        """
        if not self._unsent:
            return
        partitions = self._relayed()
        if not partitions:
            return  # owns nothing yet: it looks once the group gives it partitions
        try:
            marks = self._load_marks(partitions)
            after = min(position for position, _ in marks.values())
            while pending := self.local.read(after, _BATCH):
                self._relay(pending, partitions)
                after = pending[-1].position or after
        except ConcurrencyConflict:
            self._marks.clear()  # another replica's relay marked them: read the marks again
            raise
        self._unsent = False

    def _relay(self, pending: Sequence[Envelope], partitions: set[int]) -> None:
        marks = self._load_marks(partitions)
        todo: dict[int, list[Envelope]] = {p: [] for p in partitions}
        for env in pending:
            if self._mine(env):
                p = self.kafka.partition_of(env.saga_id)
                if p in todo and (env.position or 0) > marks[p][0]:
                    todo[p].append(env)
        sending = [e for p, envs in todo.items() for e in envs if e.position not in marks[p][1]]
        sent = self.kafka.deliver(sending)
        taken = {e.position or 0 for e, at in zip(sending, sent.positions) if at is not None}
        refused = {sending[i].position: e for i, e in sent.refused.items()}
        end = pending[-1].position or 0
        moved: dict[str, int] = {}
        docs: dict[str, dict[str, Any]] = {}
        letters: list[DeadLetter] = []
        stuck: list[Envelope] = []
        for p, envs in todo.items():
            before, ahead = marks[p]
            acknowledged = ahead | taken
            reached = end  # a partition with nothing (more) to send in this read moves to its end
            for env in envs:  # the prefix that is acknowledged or refused for good
                if env.position in refused:
                    letters.append(self._letter(env, refused[env.position]))
                elif env.position not in acknowledged:
                    reached = (env.position or 1) - 1
                    stuck.append(env)
                    break
            now_ahead = {x for x in ahead | {e.position or 0 for e in envs if e.position in taken} if x > reached}
            if reached > before:
                moved[self._source(p)] = reached
            if now_ahead != ahead:
                docs[f"{_AHEAD}-{p}"] = {"positions": sorted(now_ahead)}
            marks[p] = (max(before, reached), now_ahead)
        if letters:
            self._set_aside(letters)
            for d in letters:
                log.error("%s: %s", self.name, d.reason)
        if moved or docs:
            self.relay.put(docs, tracking=moved)
        self._marks.update(marks)
        if stuck:
            first = min(stuck, key=lambda e: e.position or 0)
            raise StoreError(
                f"{self.name}: Kafka at {self.kafka.settings.servers} did not take event {first.type} "
                f"{first.event_id} (outbox position {first.position}): {sent.error or 'no answer'}; "
                f"what it acknowledged before is marked sent, and the next flush starts from this event"
            )

    def _letter(self, env: Envelope, error: Exception) -> DeadLetter:
        now = clock.now()
        raw: dict[str, Any] = {k: getattr(env, k) for k in Envelope.__dataclass_fields__}
        raw["occurred_at"] = env.occurred_at.isoformat()
        return DeadLetter(
            service=self.name, position=env.position or 0, event_id=env.event_id, saga_id=env.saga_id,
            type=env.type, error=f"{type(error).__name__}: {error}", attempts=1, first_failed_at=now,
            last_failed_at=now, envelope=raw, status=UNPUBLISHED,
            reason=(f"Kafka refused to publish event {env.type} ({type(error).__name__}: {error}); it stays in "
                    f"{self.name}'s outbox at position {env.position}, unpublished; the relay moved past it, so "
                    "the events after it are published"),
        )

    def _set_aside(self, letters: Sequence[DeadLetter]) -> None:
        """Record refused events as dead letters, once each (a crash before the mark refuses them again)."""
        known = {d.event_id for d in self.inner.dead_letters(UNPUBLISHED)}
        new = [d for d in letters if d.event_id not in known]
        if new:
            self.inner.commit(events=[], emitted=[], tracking={}, parked=new)

    def pending(self) -> int:
        """How many emitted events (of every partition) are not yet acknowledged by Kafka (nor set aside)."""
        self._marks.clear()  # other replicas' relays may have moved their partitions
        marks = self._load_marks(range(self.kafka.partition_count()))
        after, count = min(position for position, _ in marks.values()), 0
        while batch := self.local.read(after, _BATCH):
            for env in batch:
                if self._mine(env):
                    position, ahead = marks[self.kafka.partition_of(env.saga_id)]
                    count += (env.position or 0) > position and env.position not in ahead
            after = batch[-1].position or after
        return count
