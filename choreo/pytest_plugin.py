"""pytest fixtures for testing choreo services against a real Kafka-protocol broker.

Enable them in a `conftest.py` with `pytest_plugins = ["choreo.pytest_plugin"]`:

- `kafka_broker` (session): a tansu broker on a free loopback port, stopped by PID at the end;
- `kafka_url` (per test): a `kafka://` store URL with its own topic, groups and state folder;
- `own_kafka_broker` (per test): a tansu broker for one test alone, for tests that stop it or
  `restart()` it empty;
- `postgres_server` (session): a throwaway PostgreSQL cluster (`choreo.pgcluster`) on a free
  loopback port, its socket in its temporary folder, stopped by PID at the end;
- `postgres_url` (per test): a `postgresql://` store URL of a fresh, empty database;
- `own_postgres` (per test): a cluster for one test alone, for tests that `stop()` and `start()` it.

The PostgreSQL fixtures skip the test, saying why, when the server binaries are not installed.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from choreo.pgcluster import PostgresCluster, PostgresUnavailable
from choreo.tansu import TansuBroker


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """A tansu broker for the whole test session."""
    with TansuBroker() as broker:
        yield broker


@pytest.fixture
def kafka_url(kafka_broker: TansuBroker, tmp_path: Path) -> str:
    """A Kafka store URL no other test shares (fresh topic, consumer groups and state folder)."""
    name = uuid4().hex[:12]
    return (
        f"kafka://{kafka_broker.bootstrap}?topic=t-{name}&group_prefix=g-{name}.&state={tmp_path}/state"
        "&session_timeout_ms=3000&heartbeat_interval_ms=1000"
    )


@pytest.fixture
def own_kafka_broker() -> Iterator[TansuBroker]:
    """A tansu broker for this test alone: stop it, or `restart()` it empty, without disturbing others.

    While it is down, clients keep trying to connect, and kafka-python (3.0.12) leaves the
    socket of each refused attempt to the garbage collector. The `ResourceWarning`s about
    those sockets are ignored in this test, and collected before it ends.
    """
    warnings.filterwarnings(  # undone by pytest after the test
        "ignore", message=r"Exception ignored in: <socket\.socket", category=pytest.PytestUnraisableExceptionWarning
    )
    with TansuBroker() as broker:
        yield broker
    gc.collect()


def _cluster() -> PostgresCluster:
    try:
        return PostgresCluster()
    except PostgresUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole test session (skips the test if PostgreSQL is not installed)."""
    with _cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_server: PostgresCluster) -> str:
    """A PostgreSQL store URL no other test shares (a fresh, empty database)."""
    return postgres_server.url(postgres_server.create_database())


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for this test alone: `stop()` it and `start()` it again without disturbing others."""
    with _cluster() as cluster:
        yield cluster
