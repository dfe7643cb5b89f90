"""Guarantee 6 on PostgreSQL: a commit that fails skips nothing, and the services resume.

Through a real server: the log's lock held by another session past `lock_timeout`, and the
server stopped in the middle of a run, then started again (`own_postgres`).
"""

from __future__ import annotations

import logging
import time

import pytest

from choreo import Runner, StoreError, open_store
from choreo.pgcluster import PostgresCluster
from services import system
from tests.test_commit_faults import all_ended, assert_as_planned, start_planned, wait_until

psycopg = pytest.importorskip("psycopg")
from choreo.stores.postgres import LOG_LOCK  # noqa: E402


def test_a_log_lock_held_past_the_timeout_skips_nothing_with_threads(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(f"{postgres_url}?lock_timeout=0.1")
    planned = start_planned(store, 60, seed=3)  # type: ignore[arg-type]
    runner = Runner(system, store, batch_size=7)
    blocker = psycopg.connect(postgres_url, autocommit=True)
    blocker.execute("BEGIN")
    blocker.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))  # another appender holds the log
    caplog.set_level(logging.WARNING, logger="choreo")
    runner.start_threads()
    try:
        time.sleep(1.5)  # every service reads its batch, handles it, and fails to commit it
        assert not all_ended(store, planned)  # type: ignore[arg-type]
        assert "a lock stayed held past lock_timeout (0.1s)" in caplog.text
        blocker.execute("ROLLBACK")
        assert wait_until(lambda: all_ended(store, planned)), "some sagas never ended after the lock was released"  # type: ignore[arg-type]
    finally:
        blocker.close()
        runner.stop()
    assert_as_planned(store, planned)  # type: ignore[arg-type]
    store.close()


def test_a_failed_commit_resumes_from_the_last_committed_position_when_run_by_hand(postgres_url: str) -> None:
    store = open_store(f"{postgres_url}?lock_timeout=0.05")
    planned = start_planned(store, 30, seed=5)  # type: ignore[arg-type]
    runner = Runner(system, store, batch_size=5)
    blocker = psycopg.connect(postgres_url, autocommit=True)
    failures = 0
    for round_ in range(400):
        hold = round_ % 3 == 0  # a third of the attempts meet a held lock
        if hold:
            blocker.execute("BEGIN")
            blocker.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))
        try:
            if runner.run_until_idle() == 0 and not hold:
                break
        except StoreError:
            failures += 1
        finally:
            if hold:
                blocker.execute("ROLLBACK")
    blocker.close()
    assert failures > 0
    assert_as_planned(store, planned)  # type: ignore[arg-type]
    store.close()


@pytest.mark.slow
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
