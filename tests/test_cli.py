"""The `choreo` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from choreo.cli import main


def choreo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreo", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_json_reports_every_saga_ended_and_invariants(tmp_path: Path) -> None:
    result = choreo("demo", "--orders", "80", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sagas"] == 80 and summary["ended"] == 80
    assert sum(summary["states"].values()) == 80
    assert summary["invariants_ok"] is True and summary["elapsed_s"] > 0
    assert summary["retried_handlers"] > 0 and summary["parked_events"] == 0  # flaky provider, retried
    assert (tmp_path / "choreo-demo.db").exists()


def test_run_with_a_bad_target_says_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "services.payment:nothing"]) == 2
    assert "'services.payment:nothing' is not a choreo Service" in capsys.readouterr().err
    assert main(["run", "no_such_module:service"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err


def test_run_on_a_corrupt_store_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("not a database")
    assert main(["run", "services.payment:service", "--store", f"sqlite:///{bad}"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert bad.read_text() == "not a database"
