"""The `choreo` command line: conventions, exit codes, and the example run from a checkout."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest

from choreo import Runner, open_store
from choreo import _cli_common
from choreo._cli_common import exit_code
from choreo.cli import build_parser, main
from choreo.errors import LogRewound, StoreNotFound
from choreo.stores.sqlite import SQLiteStore
from services import system
from services.demo import plan

ROOT = Path(__file__).parent.parent
SCRIPT = [str(Path(sys.executable).parent / "choreo")]  # the console script, as `pip install` makes it
MODULE = [sys.executable, "-m", "choreo"]  # from the checkout when run in ROOT


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without choreo's settings and without a PYTHONPATH that would find the example."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CHOREO_STORE", "CHOREO_SYSTEM")}
    return {**env, **extra}


def choreo(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the `choreo` console script (its folder, not `cwd`, is first on its `sys.path`)."""
    return subprocess.run([*SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=clean_env(**env))


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHOREO_STORE", "CHOREO_SYSTEM"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sagas_url(tmp_path: Path) -> str:
    """A store with 30 of the demo's sagas, every one ended."""
    url = f"sqlite:///{tmp_path}/sagas.db"
    with open_store(url) as store:
        runner = Runner(system, store)
        for saga_id, order, _, _ in plan(30, 1):
            runner.start(order, saga_id=saga_id)
        runner.run_until_idle()
    return url


@pytest.mark.slow
def test_demo_and_the_other_commands_share_the_default_store(tmp_path: Path) -> None:
    result = choreo("demo", "--orders", "80", "--json", cwd=tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sagas"] == 80 and summary["ended"] == 80
    assert sum(summary["states"].values()) == 80
    assert summary["invariants_ok"] is True and summary["elapsed_s"] > 0
    assert summary["retried_handlers"] > 0 and summary["parked_events"] == 0  # flaky provider, retried
    assert (tmp_path / "choreo.db").exists() and not (tmp_path / "choreo-demo.db").exists()
    listed = choreo("sagas", "list", "--json", "--system", "services:system", cwd=tmp_path, PYTHONPATH=str(ROOT))
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 80


def test_demo_runs_from_the_checkout_as_the_readme_says(tmp_path: Path) -> None:
    result = choreo("demo", "--orders", "10", cwd=ROOT, CHOREO_STORE=f"sqlite:///{tmp_path}/readme.db")
    assert result.returncode == 0, result.stderr
    assert "all invariants hold" in result.stdout
    assert "\r" not in result.stderr and "#" not in result.stderr  # no progress bar without a terminal


def test_demo_outside_a_checkout_says_where_to_run_it(tmp_path: Path) -> None:
    result = choreo("demo", "--orders", "10", cwd=tmp_path)
    assert result.returncode == 2
    assert "checkout" in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_targets_are_found_in_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(
        "from choreo import Event, Service, System\n"
        "class BasketCheckedOut(Event):\n"
        "    basket: str\n"
        "service = Service('shop', starts=[BasketCheckedOut])\n"
        "system = System([service])\n"
    )
    open_store(f"sqlite:///{tmp_path}/shop.db").close()
    result = choreo("dlq", "list", "--system", "shop:system", "--store", "sqlite:///shop.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 dead letter(s)" in result.stdout


def test_a_module_that_raises_at_import_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('no config file')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["run", "broken_module:service"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'broken_module'" in err and "RuntimeError: no config file" in err


def test_run_with_a_bad_target_says_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "services.payment:nothing"]) == 2
    assert "'services.payment:nothing' is not a choreo Service" in capsys.readouterr().err
    assert main(["run", "no_such_module:service"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err


def test_run_on_a_corrupt_store_names_the_file_and_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("not a database")
    assert main(["run", "services.payment:service", "--store", f"sqlite:///{bad}"]) == 3
    assert str(bad) in capsys.readouterr().err
    assert bad.read_text() == "not a database"


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["sagas", "list", "--system", "services:system", "--store", f"sqlite:///{tmp_path}/none.db"]) == 1
    assert main(["sagas", "list", "--system", "services:system", "--store", "postgres://nowhere"]) == 2
    assert exit_code(StoreNotFound("x")) == 1 and exit_code(LogRewound("x")) == 3

    def rewound(self: object, progress: object = None) -> int:
        raise LogRewound("orders.events:3 ends at offset 10, before the saved position 20")

    monkeypatch.setattr("choreo._sagas_cli.SagaProjection.update", rewound)
    open_store(f"sqlite:///{tmp_path}/s.db").close()
    assert main(["sagas", "list", "--system", "services:system", "--store", f"sqlite:///{tmp_path}/s.db"]) == 3
    assert "before the saved position" in capsys.readouterr().err


def test_commands_that_fold_or_list_services_need_the_system(
    sagas_url: str, no_settings: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["sagas", "list"], ["sagas", "show", "x"], ["replay"], ["project"], ["dlq", "list"],
                 ["dlq", "retry", "--all"]):
        assert main([*argv, "--store", sagas_url]) == 2, argv
        err = capsys.readouterr().err
        assert "--system MODULE:SYSTEM" in err and "$CHOREO_SYSTEM" in err and err.count("\n") == 1
    assert main(["dlq", "list", "--service", "payment", "--store", sagas_url]) == 0
    monkeypatch.setenv("CHOREO_SYSTEM", "services:system")
    assert main(["sagas", "list", "--store", sagas_url]) == 0
    assert "30 saga(s)" in capsys.readouterr().out


def test_version() -> None:
    result = subprocess.run([*MODULE, "--version"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"choreo {version('choreo')}"


@pytest.mark.parametrize("argv", [
    ["-v", "sagas", "list"],
    ["sagas", "list", "-v"],
    ["sagas", "-v", "list"],
    ["--log-level", "info", "dlq", "list"],
    ["dlq", "list", "--log-level", "INFO"],
])
def test_log_options_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.verbose or args.log_level == "INFO"


def test_a_log_option_before_the_subcommand_is_kept() -> None:
    args = build_parser().parse_args(["--log-level", "error", "-v", "run", "m:s"])
    assert args.log_level == "ERROR" and args.verbose is True
    args = build_parser().parse_args(["run", "m:s", "--log-level", "debug"])
    assert args.log_level == "DEBUG" and args.verbose is False


@pytest.mark.parametrize("argv, option", [
    (["run", "services.payment:service", "--batch-size", "0"], "--batch-size"),
    (["run", "services.payment:service", "--max-attempts", "0"], "--max-attempts"),
    (["demo", "--orders", "-5"], "--orders"),
    (["demo", "--timeout", "-1"], "--timeout"),
    (["demo", "--timeout", "nan"], "--timeout"),
    (["sagas", "list", "--stuck-after", "-3"], "--stuck-after"),
    (["sagas", "list", "--stuck-for", "-3"], "--stuck-for"),
    (["dlq", "show", "payment"], "ref"),
    (["dlq", "skip", "payment:1", "--reason", ""], "--reason"),
])
def test_bad_numbers_and_values_are_usage_errors_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_run_logs_a_start_and_a_stop_line_by_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/run.db"
    with subprocess.Popen([*MODULE, "run", "services.payment:service", "--store", url], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, env=clean_env()) as proc:
        guard = threading.Timer(60, proc.kill)  # never hang the suite
        guard.start()
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait() == 0
        finally:
            guard.cancel()
    assert "payment: running from" in first and url in first
    assert "payment: stopped at" in rest


def test_reset_positions_is_refused_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    open_store(url).close()
    assert main(["run", "services.payment:service", "--store", url, "--reset-positions"]) == 2
    assert "only Kafka stores" in capsys.readouterr().err


def test_reset_positions_resets_then_runs_on_a_store_that_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Rewindable(SQLiteStore):
        def reset_positions(self, service: str) -> dict[str, int]:
            self.service(service).set_tracking({"log": 0})
            return {"log": 0}

    store = Rewindable(str(tmp_path / "k.db"))
    store.service("payment").set_tracking({"log": 7})
    ran: list[dict[str, int]] = []
    monkeypatch.setattr("choreo._run_cli.open_store", lambda url, create=True: store)
    monkeypatch.setattr("choreo._run_cli.run_service",
                        lambda service, s, **_: ran.append(s.service("payment").tracking()))
    monkeypatch.setattr("choreo._run_cli.gc.freeze", lambda: None)
    assert main(["run", "services.payment:service", "--reset-positions"]) == 0
    assert ran == [{"log": 0}]  # reset first, then run
    assert "payment: position in log reset from 7 to 0" in capsys.readouterr().out


@pytest.mark.slow
def test_reset_positions_on_kafka_moves_positions_past_the_end_back(
    kafka_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_store(kafka_url) as store:
        system.start(store, plan(1, 1)[0][1])
        topic = store.topic  # type: ignore[attr-defined]
        own = store.service("payment")
        ahead = {f"{topic}:{p}": 1000 for p in store.partition_ends()}  # type: ignore[attr-defined]
        own.inner.set_tracking(ahead)  # type: ignore[attr-defined]  # as if the broker lost its data
    ran: list[str] = []
    monkeypatch.setattr("choreo._run_cli.run_service", lambda service, s, **_: ran.append(service.name))
    monkeypatch.setattr("choreo._run_cli.gc.freeze", lambda: None)
    assert main(["run", "services.payment:service", "--store", kafka_url, "--reset-positions"]) == 0
    out = capsys.readouterr().out
    assert ran == ["payment"]
    assert all(f"payment: position in {source} reset from 1000 to 0" in out for source in ahead), out
    with open_store(kafka_url) as store:
        assert all(store.service("payment").tracking().get(source) == 0 for source in ahead)


def test_sagas_no_update_writes_and_creates_nothing(sagas_url: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sagas.db"

    def schema_and_projection() -> tuple[list[str], list[tuple[object, ...]]]:
        with sqlite3.connect(path) as conn:
            names = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
            tracked = conn.execute("SELECT * FROM rm_sagas_tracking").fetchall() if "rm_sagas_tracking" in names else []
        return names, tracked

    before = schema_and_projection()
    assert main(["sagas", "list", "--no-update", "--system", "services:system", "--store", sagas_url]) == 0
    assert schema_and_projection() == before  # never built: nothing created, nothing listed
    assert "0 saga(s)" in capsys.readouterr().out
    assert main(["sagas", "list", "--system", "services:system", "--store", sagas_url]) == 0
    built = schema_and_projection()
    assert "30 saga(s)" in capsys.readouterr().out
    with open_store(sagas_url) as store:  # the log grows; the read-only command does not fold it in
        system.start(store, plan(31, 1)[30][1], saga_id="later")
    assert main(["sagas", "list", "--no-update", "--json", "--system", "services:system", "--store", sagas_url]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 30 and schema_and_projection() == built
    shown = plan(30, 1)[0][0]
    assert main(["sagas", "show", shown, "--no-update", "--system", "services:system", "--store", sagas_url]) == 0
    assert shown in capsys.readouterr().out and schema_and_projection() == built


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/many.db"
    with open_store(url) as store:  # far more output than a pipe holds
        system.start_many(store, [(order, saga_id) for saga_id, order, _, _ in plan(2000, 4)])
    with subprocess.Popen([*MODULE, "sagas", "list", "--system", "services:system", "--store", url], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()  # `| head -1`
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(60) in (0, 141)
    assert err == b""


def test_replay_draws_no_progress_bar_into_a_pipe(sagas_url: str) -> None:
    result = subprocess.run([*MODULE, "replay", "--system", "services:system", "--store", sagas_url], cwd=ROOT,
                            capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "replayed" in result.stdout


def test_the_readme_documents_every_exit_code() -> None:
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)}
    names = ("OK", "FAILED", "USAGE", "UNAVAILABLE", "INTERRUPTED", "BROKEN_PIPE")
    used = {getattr(_cli_common, name) for name in names}
    assert documented == used
