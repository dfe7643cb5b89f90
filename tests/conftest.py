from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo import InMemoryStore, open_store
from choreo.sqlite import SQLiteStore

pytest_plugins = ["choreo.pytest_plugin"]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "choreo.db"


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[SQLiteStore]:
    store = open_store(f"sqlite:///{db_path}")
    assert isinstance(store, SQLiteStore)
    yield store
    store.close()


@pytest.fixture(params=["memory", "sqlite"])
def any_store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[object]:
    store = InMemoryStore() if request.param == "memory" else open_store(f"sqlite:///{db_path}")
    yield store
    store.close()
