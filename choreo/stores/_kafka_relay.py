"""A service's own store on Kafka, and the relay that publishes its outbox.

The service's SQLite file (`STATE/svc-NAME.db`) holds its aggregates, tracking,
handled ids, dead letters and deadlines, and, in its log table, the outbox: every
event the service emitted, written in the handler's transaction. `flush()` publishes
the outbox in order and marks, in the relay's own tracking, how far the broker
acknowledged it:

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
from choreo.errors import StoreError
from choreo.events import Envelope
from choreo.store import DeadLetter, ServiceStore, Tracking

if TYPE_CHECKING:
    from collections.abc import Mapping

    from choreo.stores.kafka import KafkaStore

log = logging.getLogger("choreo.stores.kafka")

#: the status of a dead letter for an emitted event Kafka refused to take
UNPUBLISHED = "unpublished"
#: how many outbox events the relay sends at a time
_BATCH = 1000
#: the relay's document listing positions acknowledged after its tracking (after a failed send)
_AHEAD = "ahead"


class _KafkaServiceStore(ServiceStore):
    """A service's own SQLite store; its log table is the outbox, published by `flush()`."""

    def __init__(self, kafka: KafkaStore, name: str) -> None:
        self.kafka = kafka
        self.name = name
        self.local = kafka.local(f"svc-{name}.db")
        self.inner = self.local.service(name)
        # what Kafka acknowledged: written without fsync (losing a mark only means sending again)
        self.relay = kafka.local(f"svc-{name}.db", durability="normal").documents("outbox_relay")
        self._unsent = True  # unknown until the first flush looks
        self._ahead: set[int] | None = None  # read at the first flush

    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        return self.inner.load(aggregate_id)

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list[StoredEvent]]:
        return self.inner.load_many(aggregate_ids)

    def load_latest(self, aggregate_id: UUID) -> tuple[StoredEvent | None, list[StoredEvent]]:
        return self.inner.load_latest(aggregate_id)

    def tracking(self) -> Tracking:
        return self.inner.tracking()

    def set_tracking(self, tracking: Mapping[str, int]) -> None:
        self.inner.set_tracking(tracking)

    def seen(self, event_ids: Sequence[str]) -> set[str]:
        return self.inner.seen(event_ids)

    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        return self.inner.dead_letters(status)

    def due_retries(self, now: datetime, limit: int = 100) -> list[DeadLetter]:
        return self.inner.due_retries(now, limit)

    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        return self.inner.due_deadlines(now, limit)

    def commit(self, **changes: Any) -> None:
        self.inner.commit(**changes)
        if changes.get("emitted"):
            self._unsent = True
            try:  # the commit is durable: a broker that does not answer now only delays the relay
                self.flush()
            except StoreError as e:
                log.warning("%s: committed; publishing waits for Kafka: %s", self.name, e)

    def oversized(self, env: Envelope) -> str | None:
        """Why the topic cannot take `env` (its Kafka record is over `max_event_bytes`), or None."""
        return self.kafka.oversized(env)

    def flush(self) -> None:
        """Publish the outbox in order; mark what the broker acknowledged, set aside what it refuses.

        Raises `StoreError` if the broker did not take an event (after marking what it took
        before it); the next flush starts from that event.
        """
        if not self._unsent:
            return
        self._acknowledged_ahead()
        while pending := self.local.read(self.relay.position(), _BATCH):
            self._relay(pending)
        self._unsent = False

    def _acknowledged_ahead(self) -> set[int]:
        """Positions the broker acknowledged after the relay's tracking (a send before them failed)."""
        if self._ahead is None:
            self._ahead = {int(p) for p in (self.relay.get(_AHEAD) or {}).get("positions", [])}
        return self._ahead

    def _relay(self, pending: Sequence[Envelope]) -> None:
        assert self._ahead is not None
        after = self.relay.position()
        todo = [e for e in pending if e.position not in self._ahead]
        sent = self.kafka.deliver(todo)
        taken = self._ahead | {e.position or 0 for e, p in zip(todo, sent.positions) if p is not None}
        refused = {todo[i].position: e for i, e in sent.refused.items()}
        reached, letters = after, []
        for env in pending:  # the prefix that is acknowledged or refused for good
            if env.position in refused:
                letters.append(self._letter(env, refused[env.position]))
            elif env.position not in taken:
                break
            reached = env.position or reached
        ahead = {p for p in taken if p > reached}
        if letters:
            self._set_aside(letters)
            for d in letters:
                log.error("%s: %s", self.name, d.reason)
        if reached > after or ahead != self._ahead:
            docs = {_AHEAD: {"positions": sorted(ahead)}} if ahead != self._ahead else {}
            self.relay.put(docs, tracking={"log": reached} if reached > after else {})
            self._ahead = ahead
        if reached < (pending[-1].position or 0):
            stuck = next(e for e in pending if (e.position or 0) > reached)
            raise StoreError(
                f"{self.name}: Kafka at {self.kafka.settings.servers} did not take event {stuck.type} "
                f"{stuck.event_id} (outbox position {stuck.position}): {sent.error or 'no answer'}; "
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
        """How many emitted events are not yet acknowledged by Kafka (nor set aside)."""
        return self.local.last_position() - self.relay.position() - len(self._acknowledged_ahead())
