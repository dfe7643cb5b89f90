"""An in-memory test harness for users' own tests: the whole system, no files, no threads."""

from __future__ import annotations

from choreo.events import Envelope, Event
from choreo.runner import Runner
from choreo.stores.memory import InMemoryStore
from choreo.system import System


class TestSystem(Runner):
    """Runs a system on an in-memory store; `run()` processes until every service is idle."""

    __test__ = False

    def __init__(self, system: System, **options: object) -> None:
        super().__init__(system, InMemoryStore(), **options)  # type: ignore[arg-type]

    def run(self) -> None:
        """Process until no service has anything left to do."""
        self.run_until_idle()

    def envelopes(self, saga_id: str | None = None) -> list[Envelope]:
        """Every event in the log (of one saga, if given), in log order."""
        out = [e for batch in self.store.scan() for e in batch]
        return [e for e in out if saga_id is None or e.saga_id == saga_id]

    def events(self, saga_id: str | None = None) -> list[Event]:
        """The decoded events of the log (of one saga, if given), in log order."""
        return [e.decode() for e in self.envelopes(saga_id)]

    def types(self, saga_id: str | None = None) -> list[str]:
        """The type names of the log's events (of one saga, if given), in log order."""
        return [e.type for e in self.envelopes(saga_id)]
