from __future__ import annotations

from collections.abc import Iterator
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from choreo import InMemoryStore, open_store
from choreo.stores.sqlite import SQLiteStore

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


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[object]:
    if request.param == "memory":
        store = InMemoryStore()
    else:
        url = request.getfixturevalue("postgres_url") if request.param == "postgres" else f"sqlite:///{db_path}"
        store = open_store(url)
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """A fresh store's URL on SQLite, then on PostgreSQL (a new database of the session's cluster)."""
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else f"sqlite:///{db_path}"


@pytest.fixture
def durable_store(durable_url: str) -> Iterator[object]:
    """A fresh store on SQLite, then on PostgreSQL."""
    store = open_store(durable_url)
    yield store
    store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for this test, to fill up (skipped where it cannot be mounted: needs root)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)
