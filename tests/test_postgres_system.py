"""The example system end to end on PostgreSQL: a `choreo run` process per service (`choreo demo --processes`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def choreo(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "choreo", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_demo_with_a_process_per_service_ends_every_saga_with_the_invariants_holding(postgres_url: str) -> None:
    summary = json.loads(choreo("demo", "--processes", "--orders", "150", "--json", "--per-saga",
                                "--store", postgres_url))
    assert summary["mode"] == "processes" and summary["ended"] == summary["sagas"] == 150
    assert summary["invariants_ok"], summary["invariants"]
    assert summary["parked_events"] == 0
    listed = json.loads(choreo("sagas", "list", "--json", "--store", postgres_url, "--system", "services:system"))
    assert {s["saga_id"]: s["state"] for s in listed} == summary["final_states"]
