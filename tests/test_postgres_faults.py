"""Guarantee 6 on PostgreSQL: a commit that fails skips nothing, and the services resume.

Through a real server: the server stopped in the middle of a run, then started again
(`own_postgres`). The log's lock held by another session past `lock_timeout` is tested with
SQLite's in tests/test_commit_faults.py (`durable_url`).
"""

from __future__ import annotations

import logging
import time

import pytest

from choreo import Runner, StoreError, open_store
from choreo.pgcluster import PostgresCluster
from services import system
from tests.test_commit_faults import all_ended, assert_as_planned, start_planned, wait_until

pytest.importorskip("psycopg")


def test_a_server_stopped_mid_run_is_a_clear_error_and_every_saga_ends_once_it_is_back(
    own_postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = own_postgres.url(own_postgres.create_database())
    store = open_store(url)
    planned = start_planned(store, 80, seed=4)  # type: ignore[arg-type]
    started = store.last_position()  # type: ignore[attr-defined]
    runner = Runner(system, store, batch_size=3)
    caplog.set_level(logging.WARNING, logger="choreo")
    runner.start_threads()
    try:
        assert wait_until(lambda: store.last_position() > started + 40, 30)  # type: ignore[attr-defined]
        own_postgres.stop()  # fast shutdown: the server ends every session
        time.sleep(1.0)
        assert "lost the connection to the server" in caplog.text or "is not reachable" in caplog.text
        with pytest.raises(StoreError, match="is not reachable"):
            store.last_position()  # type: ignore[attr-defined]
        own_postgres.start()
        assert wait_until(lambda: all_ended(store, planned), 90), "some sagas never ended after the restart"  # type: ignore[arg-type]
    finally:
        runner.stop()
    assert_as_planned(store, planned)  # type: ignore[arg-type]
    store.close()
