"""The PostgreSQL store through a real server (a throwaway cluster: `postgres_server`): the log contract,
its own settings and errors, and gap-free positions under concurrent appenders."""

from __future__ import annotations

import pytest

from choreo import EventStore, open_store
from tests.store_contract import LogStoreContract


class TestPostgresStore(LogStoreContract):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _url(self, postgres_url: str) -> None:
        self.url = postgres_url

    def make_store(self) -> EventStore:
        return open_store(self.url)
