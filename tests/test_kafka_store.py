"""The log contract on Kafka (a real broker: tansu), and Kafka's own formats and faults."""

from __future__ import annotations

import pytest

from choreo import EventStore, open_store
from tests.store_contract import EventStoreContract


class TestKafkaStore(EventStoreContract):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _url(self, kafka_url: str) -> None:
        self.url = kafka_url

    def make_store(self) -> EventStore:
        return open_store(self.url)
