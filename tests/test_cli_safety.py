"""Operator commands that cannot do harm: refused for unknown or ended sagas, no store created, no data replaced."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

import pytest

from choreo import Envelope, Runner, open_store
from choreo.cli import main
from choreo.events import encode_payload
from choreo.operations import CommandRefused, SagaNotFound, force_compensation, saga_status
from services import system
from services.checks import read_facts
from services.contracts import OrderConfirmed, OrderPlaced
from services.demo import plan


def order(i: int, **changes: object) -> OrderPlaced:
    fields: dict[str, object] = dict(order_id=f"o-{i}", customer_id=f"customer-{i}", sku="widget", quantity=1,
                                     amount=100, address="1 Main St")
    return OrderPlaced(**{**fields, **changes})  # type: ignore[arg-type]


def log_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM choreo_log").fetchone()[0])


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.fixture
def ended(tmp_path: Path) -> tuple[str, str, str]:
    """A store with one confirmed and one cancelled order: (url, completed saga, failed saga)."""
    url = f"sqlite:///{tmp_path}/ops.db"
    with open_store(url) as store:
        runner = Runner(system, store)
        completed = runner.start(order(1))
        failed = runner.start(order(2, address="nowhere"))  # undeliverable: compensated, cancelled
        runner.run_until_idle()
        facts = read_facts(store)
        assert facts[completed].state == "completed" and facts[failed].state == "failed"
    return url, completed, failed


def test_compensate_of_an_unknown_saga_writes_nothing_and_exits_1(
    ended: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _, _ = ended
    before = log_rows(tmp_path / "ops.db")
    assert main(["dlq", "compensate", "no-such-saga", "--reason", "typo", "--store", url]) == 1
    err = capsys.readouterr().err
    assert "no saga 'no-such-saga'" in err and err.count("\n") == 1
    assert log_rows(tmp_path / "ops.db") == before


@pytest.mark.parametrize("with_system", [False, True], ids=["log only", "with --system"])
def test_compensate_of_an_ended_saga_is_refused_with_its_state(
    ended: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], with_system: bool
) -> None:
    url, completed, failed = ended
    extra = ["--system", "services:system"] if with_system else []
    before = log_rows(tmp_path / "ops.db")
    for saga_id, state in ((completed, "completed"), (failed, "failed")):
        assert main(["dlq", "compensate", saga_id, "--reason", "customer asked", "--store", url, *extra]) == 1
        err = capsys.readouterr().err
        assert f"already {state}" in err and "nothing was written" in err
    assert log_rows(tmp_path / "ops.db") == before
    with open_store(url) as store:  # nothing to carry out: the confirmed order is not refunded
        Runner(system, store).run_until_idle()
        assert read_facts(store)[completed].refunded == 0 and read_facts(store)[completed].state == "completed"


def test_force_compensation_checks_the_saga_in_the_python_api_too(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path}/api.db") as store:
        runner = Runner(system, store)
        done = runner.start(order(1))
        runner.run_until_idle()
        running = runner.start(order(2))  # started, not yet handled by anyone
        with pytest.raises(SagaNotFound) as unknown:
            force_compensation(store, "nope", "typo")
        assert isinstance(unknown.value, LookupError)
        with pytest.raises(CommandRefused) as refused:
            force_compensation(store, done, "too late", sagas=system.sagas)
        assert refused.value.state == "completed"
        force_compensation(store, running, "customer cancelled")  # a running saga: allowed
        runner.run_until_idle()
        assert read_facts(store)[running].state == "failed"
        status = saga_status(store, running)
        assert status is not None and status.state == "failed"


def test_a_definitions_end_event_shows_the_saga_ended_on_a_log_without_choreos_end_events(tmp_path: Path) -> None:
    """A log written before choreo ended sagas itself: the definition's end types tell."""
    saga_id = str(uuid4())

    def envelope(event: OrderPlaced | OrderConfirmed, service: str) -> Envelope:
        return Envelope(event_id=str(uuid4()), type=event.event_type, version=1, saga_id=saga_id, causation_id=None,
                        service=service, step=None, outcome=None, occurred_at=datetime.now(timezone.utc),
                        payload=encode_payload(event))

    with open_store(f"sqlite:///{tmp_path}/old.db") as store:
        store.append([envelope(order(1), "orders"), envelope(OrderConfirmed(order_id="o-1", amount=100), "orders")])
        status = saga_status(store, saga_id, system.sagas)
        assert status is not None and (status.state, status.ended_by) == ("completed", "OrderConfirmed")
        with pytest.raises(CommandRefused, match="already completed"):
            force_compensation(store, saga_id, "too late", sagas=system.sagas)
        without = saga_status(store, saga_id)  # no definitions: nothing says the saga ended
        assert without is not None and without.state == "running" and without.events == 2


def test_read_commands_create_no_store_and_no_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.db"
    url = f"sqlite:///{missing}"
    for argv in (
        ["dlq", "list", "--service", "payment"],
        ["dlq", "list", "--system", "services:system"],
        ["dlq", "show", "payment:1"],
        ["sagas", "list", "--system", "services:system"],
        ["sagas", "show", "some-saga", "--system", "services:system"],
        ["sagas", "list", "--no-update", "--system", "services:system"],
        ["replay", "--system", "services:system"],
    ):
        assert main([*argv, "--store", url]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(missing) in err, (argv, err)
        assert list(tmp_path.iterdir()) == [], argv
    existing = tmp_path / "existing.db"
    open_store(f"sqlite:///{existing}").close()
    before = tables(existing)
    assert main(["dlq", "show", "ghost:1", "--store", f"sqlite:///{existing}"]) == 1
    assert main(["dlq", "list", "--service", "ghost", "--store", f"sqlite:///{existing}"]) == 1
    assert "ghost" in capsys.readouterr().err
    assert tables(existing) == before


def test_write_commands_do_not_create_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/missing.db"
    for argv in (
        ["dlq", "retry", "payment:1"],
        ["dlq", "retry", "--all", "--system", "services:system"],
        ["dlq", "skip", "payment:1", "--reason", "r"],
        ["dlq", "compensate", "some-saga", "--reason", "r"],
    ):
        assert main([*argv, "--store", url]) == 1, argv
        assert "no such choreo store" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == [], argv


def test_demo_refuses_a_store_holding_other_data_unless_reset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine.db"
    with open_store(f"sqlite:///{mine}") as store:
        saga = system.start(store, order(1))
    assert main(["demo", "--orders", "5", "--store", f"sqlite:///{mine}"]) == 1
    err = capsys.readouterr().err
    assert "did not write" in err and saga in err and "--reset" in err and err.count("\n") == 1
    with open_store(f"sqlite:///{mine}", create=False) as store:
        assert [e.saga_id for batch in store.scan() for e in batch] == [saga]  # untouched

    other = tmp_path / "app.db"  # not a choreo store at all
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (name TEXT)")
    assert main(["demo", "--orders", "5", "--store", f"sqlite:///{other}"]) == 1
    assert "not a choreo store" in capsys.readouterr().err
    assert tables(other) == {"customers"}

    assert main(["demo", "--orders", "5", "--store", f"sqlite:///{mine}", "--reset"]) == 0
    demo_ids = {saga_id for saga_id, *_ in plan(5, 7)}
    with open_store(f"sqlite:///{mine}", create=False) as store:
        assert {e.saga_id for batch in store.scan() for e in batch} == demo_ids
    # a previous demo's data is the demo's to replace, or to keep; a missing store is fine
    assert main(["demo", "--orders", "5", "--store", f"sqlite:///{mine}", "--seed", "3"]) == 0
    assert main(["demo", "--orders", "5", "--store", f"sqlite:///{mine}", "--seed", "3", "--keep"]) == 0
    assert main(["demo", "--orders", "5", "--store", f"sqlite:///{tmp_path}/new.db"]) == 0
    capsys.readouterr()


def test_a_query_with_other_saga_definitions_reads_the_projection_and_never_rebuilds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    store = open_store(url)
    saga = system.start(store, order(1))
    Runner(system, store).run_until_idle()
    store.close()
    assert main(["sagas", "list", "--store", url, "--system", "services:system", "--json"]) == 0
    built = capsys.readouterr().out
    (tmp_path / "bare_system.py").write_text(
        "from choreo import System\nfrom services import SERVICES\nsystem = System(SERVICES)\n")
    monkeypatch.chdir(tmp_path)  # MODULE:ATTR targets are found in the current directory
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    assert main(["sagas", "list", "--store", url, "--system", "bare_system:system", "--json"]) == 0
    seen = capsys.readouterr()
    assert "other saga definitions" in seen.err and "choreo replay" in seen.err
    assert saga in seen.out and '"saga_type": "order_fulfilment"' in seen.out  # read as stored, not refolded
    assert main(["sagas", "list", "--store", url, "--system", "services:system", "--json"]) == 0
    assert capsys.readouterr().out == built  # and the stored projection is untouched
