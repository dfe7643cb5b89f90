"""Structured logs: choreo's records carry service, saga_id and event_id; `--log-format json` writes JSON lines."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from choreo import InMemoryStore, Processor, logs
from services import system
from services.demo import plan
from services.payment import service as payment
from tests.service_processes import REPO, env_with, wait_for

CHOREO = REPO / "choreo"


def test_every_logger_of_choreo_has_the_filter() -> None:
    names = set()
    for path in CHOREO.rglob("*.py"):
        names |= set(re.findall(r"getLogger\(\"(choreo[^\"]*)\"\)", path.read_text()))
    assert names and names <= set(logs.LOGGERS)
    for name in logs.LOGGERS:
        assert logs._FILTER in logging.getLogger(name).filters


def flaky_order() -> tuple[str, object]:
    saga_id, order, _, _ = next(p for p in plan(20, 7) if p[2] == "completed")
    return saga_id, order.model_copy(update={"customer_id": "flaky-7"})


def test_records_carry_the_service_saga_and_event(caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()
    saga_id, order = flaky_order()
    system.start(store, order, saga_id=saga_id)
    processor = Processor(payment, store)
    inventory = Processor(system["inventory"], store)
    inventory.run_until_idle()
    with caplog.at_level(logging.INFO, logger="choreo"):
        processor.poll()  # the provider times out: a retry is scheduled, and logged
    record = next(r for r in caplog.records if "next attempt" in r.getMessage())
    reserved = next(e for batch in store.scan() for e in batch if e.type == "ItemsReserved")
    assert (record.service, record.saga_id, record.event_id) == ("payment", saga_id, reserved.event_id)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="choreo"):
        logging.getLogger("choreo").info("no event here")
    assert (caplog.records[0].service, caplog.records[0].saga_id, caplog.records[0].event_id) == (
        "payment", None, None)  # the service bound by the processor's poll in this thread


def test_json_formatter_writes_one_object_a_line() -> None:
    record = logging.LogRecord("choreo", logging.ERROR, __file__, 1, "parked %s", ("x",), None)
    logs._FILTER.filter(record)
    record.saga_id = "s-1"
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    got = json.loads(line)
    assert got["message"] == "parked x" and got["level"] == "ERROR" and got["saga_id"] == "s-1"
    assert set(logs.FIELDS) <= set(got)


@pytest.mark.slow
def test_choreo_run_log_format_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/choreo.db"
    from choreo import open_store

    saga_id, order = flaky_order()
    with open_store(url) as store:
        system.start(store, order, saga_id=saga_id)
        inventory = Processor(system["inventory"], store)
        inventory.run_until_idle()
        inventory.close()
    err = tmp_path / "payment.err"
    with open(err, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "choreo", "run", "services.payment:service", "--store", url,
                                 "--log-format", "json"], cwd=REPO, env=env_with(), stderr=out,
                                stdout=subprocess.DEVNULL)
        try:
            wait_for("the retry's log line", lambda: "next attempt" in err.read_text(), 30, {"payment": proc})
        finally:
            proc.terminate()
            proc.wait(30)
    lines = [json.loads(line) for line in err.read_text().splitlines()]  # every line is one JSON object
    assert lines and all(set(logs.FIELDS) <= set(line) for line in lines)
    assert all(line["service"] == "payment" for line in lines if line["logger"].startswith("choreo"))
    retry = next(line for line in lines if "next attempt" in line["message"])
    assert retry["saga_id"] == saga_id and retry["event_id"] and retry["level"] == "INFO"
    assert any("stopped at" in line["message"] for line in lines)
