"""The processor's part in replicas (a part of `Processor`): its claims, and what they change.

See `choreo.replicas` for the claims themselves. A processor that is not a replica
(`replica` None) takes none of these paths but `_mine()` and `_reached()`, which are
then what they always were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from choreo.errors import WiringError
from choreo.replicas import Replica, ReplicaSettings
from choreo.store import LOG, EventStore, Held, LogStore, ServiceStore, Tracking, advance

if TYPE_CHECKING:
    from choreo.events import Envelope
    from choreo.service import Service

log = logging.getLogger("choreo")


class Replicated:
    """The processor's replica, if it is one (a part of `Processor`)."""

    service: Service
    store: EventStore
    own: ServiceStore
    tracking: dict[str, int]
    replica: Replica | None
    _held: Held

    if TYPE_CHECKING:  # provided by Processor (nothing at run time: no shadowing)
        async def _io(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def _replica_of(self, settings: ReplicaSettings | None) -> Replica | None:
        """This process's replica of the service: as asked, or because its work is split already."""
        splits = isinstance(self.store, LogStore) and self.own.supports_claims
        if settings is None and splits:
            segments = self.own.segments()
            if segments:  # replicas split it already: doing it all alongside them would do work twice
                settings = ReplicaSettings(segments=segments)
        if settings is None:
            return None
        if not splits:
            raise WiringError(f"{self.service.name}: the store {self.store.url} cannot split a service's work "
                              "among replicas (on Kafka, a service's processes share the partitions instead)")
        replica = Replica(self.own, settings)
        replica.tick()
        self._held = replica.held()
        return replica

    async def _keep_claims(self) -> None:
        """Renew this replica's claims if it is time, in the middle of a long batch too.

        A failure here is only logged: it is not the handler's, and the commit's own check
        of the claims is what keeps a replica that lost one from writing.
        """
        if self.replica is not None and self.replica.due():
            try:
                await self._io(self.replica.renew)
            except Exception as e:
                log.warning("%s: could not renew the claims of replica %s: %s: %s", self.service.name,
                            self.replica.id, type(e).__name__, e)

    def _mine(self, saga_id: str) -> bool:
        """Whether this process handles the saga (always, unless it is one replica of several)."""
        return self.replica is None or self.replica.owns(saga_id)

    def _feed_tracking(self) -> Tracking:
        """Where the feed starts: the tracking (a replica: the least position of the segments it holds)."""
        if self.replica is None:
            return self.own.tracking()
        return {LOG: self.replica.start(LOG, self.own.tracking())}

    def _reached(self, done: Sequence[Envelope]) -> Tracking:
        """The tracking that committing `done` reaches (a replica: each segment it holds)."""
        if self.replica is None:
            return advance(done)
        if not done:
            return {}
        return self.replica.reached(done[-1].source, done[-1].position or 0, self.tracking)
