from __future__ import annotations

from pathlib import Path

import pytest

from choreo import EventStore, InMemoryStore, StoreURLError, open_store
from tests.store_contract import LogStoreContract


class TestInMemoryStore(LogStoreContract):
    __test__ = True

    def make_store(self) -> EventStore:
        return InMemoryStore()


class TestSQLiteStore(LogStoreContract):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.path = tmp_path / "contract.db"

    def make_store(self) -> EventStore:
        return open_store(f"sqlite:///{self.path}")


@pytest.mark.parametrize(
    "url, match",
    [
        ("mysql://localhost/db", "unsupported store URL"),
        ("sqlite:///x.db?speed=max", "unknown setting"),
        ("sqlite:///x.db?durability=reckless", "unknown durability"),
        ("sqlite:///x.db?lock_timeout=soon", "lock_timeout"),
    ],
)
def test_bad_store_urls_say_what_is_wrong(url: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreURLError, match=match):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


def test_read_only_is_accepted_for_every_scheme() -> None:
    from choreo.errors import StoreError

    assert open_store("memory://", create=False).read_only is False  # a new memory store either way
    with pytest.raises(StoreError, match="not reachable"):  # not "unknown Kafka setting 'create'"
        open_store("kafka://127.0.0.1:9?request_timeout_ms=500", create=False)
