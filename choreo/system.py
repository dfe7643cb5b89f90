"""A system: services and saga definitions wired together and checked at startup."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import NAMESPACE_URL, uuid4, uuid5

from choreo import clock, tracing
from choreo.errors import ConcurrencyConflict, WiringError
from choreo.events import Envelope, Event, encode_payload
from choreo.saga import SagaDefinition
from choreo.service import Service
from choreo.store import EventStore

_START_NAMESPACE = uuid5(NAMESPACE_URL, "https://choreo.dev/start")


class System:
    """The services of one business process; checks that steps and start events are owned once."""

    def __init__(self, services: Iterable[Service], *, sagas: Iterable[SagaDefinition] = ()) -> None:
        self.services: dict[str, Service] = {}
        for s in services:
            if s.name in self.services:
                raise WiringError(f"two services are named {s.name!r}")
            s.validate()
            self.services[s.name] = s
        self.sagas = tuple(sagas)
        self.step_owners: dict[str, str] = {}
        self.origins: dict[str, str] = {}
        for s in self.services.values():
            for step in s.steps:
                other = self.step_owners.setdefault(step, s.name)
                if other != s.name:
                    raise WiringError(f"step {step!r} is owned by two services: {other!r} and {s.name!r}")
            for cls in s.starts:
                other = self.origins.setdefault(cls.event_type, s.name)
                if other != s.name:
                    raise WiringError(
                        f"event {cls.event_type!r} is started by two services: {other!r} and {s.name!r}"
                    )
        for saga in self.sagas:
            triggers: dict[str, str] = {}
            for step in saga.steps:
                if step not in self.step_owners:
                    raise WiringError(f"saga {saga.name!r}: no service owns step {step!r}")
                trigger = self.services[self.step_owners[step]].steps[step].event_type
                other = triggers.setdefault(trigger.event_type if trigger else "", step)
                if other != step:
                    raise WiringError(
                        f"saga {saga.name!r}: steps {other!r} and {step!r} both start on {trigger.__name__ if trigger else '?'}; "
                        "choreo ends sagas whose steps run one after another (each triggered by the one before), "
                        "so parallel steps are not supported yet"
                    )
            if saga.start.event_type not in self.origins:
                raise WiringError(
                    f"saga {saga.name!r}: no service declares starts=[{saga.start.__name__}]"
                )

    def __getitem__(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise WiringError(f"no service named {name!r} (have: {sorted(self.services)})") from None

    def start(self, store: EventStore, event: Event, *, saga_id: str | None = None) -> str:
        """Append the saga's initiating event to the log and return the saga id.

        Starting a saga id that is already started changes nothing (idempotent).
        """
        envelope = self._start_envelope(event, saga_id)
        try:
            store.append([envelope])
        except ConcurrencyConflict:
            pass  # already started
        return envelope.saga_id

    def start_many(self, store: EventStore, starts: Iterable[tuple[Event, str | None]]) -> list[str]:
        """Start many sagas with one append (one transaction on SQLite); return their saga ids.

        Each item is (initiating event, saga id or None). Idempotent like `start()`.
        """
        envelopes = [self._start_envelope(event, saga_id) for event, saga_id in starts]
        try:
            store.append(envelopes)
        except ConcurrencyConflict:  # some were started already: start the others one by one
            for env in envelopes:
                try:
                    store.append([env])
                except ConcurrencyConflict:
                    pass
        return [env.saga_id for env in envelopes]

    def _start_envelope(self, event: Event, saga_id: str | None) -> Envelope:
        origin = self.origins.get(type(event).event_type)
        if origin is None:
            raise WiringError(
                f"no service starts sagas with {type(event).__name__}; declare "
                f"Service(..., starts=[{type(event).__name__}])"
            )
        saga_id = saga_id or str(uuid4())
        with tracing.starting(event.event_type, saga_id):
            trace = tracing.carried(None)
        envelope = Envelope(
            event_id=str(uuid5(_START_NAMESPACE, saga_id)),
            type=event.event_type,
            version=event.schema_version,
            saga_id=saga_id,
            causation_id=None,
            service=origin,
            step=None,
            outcome=None,
            occurred_at=clock.now(),
            payload=encode_payload(event),
            trace=trace,
        )
        return envelope
