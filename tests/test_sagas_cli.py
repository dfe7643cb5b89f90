"""`choreo sagas list`: paging with --limit/--after, and the progress of a long catch-up."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from choreo import Runner, SagaProjection, open_store
from choreo import _sagas_cli
from choreo.cli import main
from services import system
from services.demo import plan

LIST = ["sagas", "list", "--system", "services:system"]


@pytest.fixture
def sagas_url(tmp_path: Path) -> str:
    """A store with 12 of the demo's sagas, every one ended, and no projection yet."""
    url = f"sqlite:///{tmp_path}/sagas.db"
    with open_store(url) as store:
        runner = Runner(system, store)
        for saga_id, order, _, _ in plan(12, 3):
            runner.start(order, saga_id=saga_id)
        runner.run_until_idle()
    return url


def listed(url: str, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main([*LIST, "--store", url, "--json", *args]) == 0
    return [s["saga_id"] for s in json.loads(capsys.readouterr().out)]


def test_pages_of_limit_sagas_after_the_last_one_list_every_saga_once_in_order(
        sagas_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    everything = listed(sagas_url, capsys)
    assert len(everything) == 12
    pages, after = [], []
    for _ in range(5):  # bounded: a cursor that does not move must fail, not loop
        page = listed(sagas_url, capsys, "--limit", "5", *after)
        if not page:
            break
        assert len(page) <= 5
        pages.append(page)
        after = ["--after", page[-1]]
    assert [len(p) for p in pages] == [5, 5, 2] and sum(pages, []) == everything
    # the text output says where the next page starts, and only while there is one
    assert main([*LIST, "--store", sagas_url, "--limit", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"5 saga(s); more after them: --after {everything[4]}"
    assert main([*LIST, "--store", sagas_url, "--limit", "2", "--after", everything[9]]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 saga(s)"


def test_paging_applies_after_the_filters(sagas_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    failed = listed(sagas_url, capsys, "--state", "failed")
    assert 2 <= len(failed) < 12  # the plan fails some orders
    assert listed(sagas_url, capsys, "--state", "failed", "--limit", "1", "--after", failed[0]) == failed[1:2]


def test_paging_input_that_is_wrong_is_named(sagas_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*LIST, "--store", sagas_url, "--after", "no-such-saga"]) == 1
    assert "--after: no saga 'no-such-saga'" in capsys.readouterr().err
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as e:
            main([*LIST, "--store", sagas_url, "--limit", bad])
        assert e.value.code == 2
        assert "not a whole number above 0" in capsys.readouterr().err
    projection = SagaProjection(open_store(sagas_url), sagas=system.sagas)
    with pytest.raises(ValueError, match="at least 1"):
        projection.list(limit=0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_catch_up_shows_progress_on_a_terminal_and_clears_it(
        sagas_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(SagaProjection, "__init__", small_batches(SagaProjection.__init__))
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert main([*LIST, "--store", sagas_url]) == 0
    text = err.getvalue()
    assert "\rchoreo: updating the saga projection: 20/" in text and text.endswith("\r\033[K")
    assert "12 saga(s)" in capsys.readouterr().out
    err.truncate(0)
    assert main([*LIST, "--store", sagas_url]) == 0  # up to date: nothing to show
    assert err.getvalue().strip("\x00") == ""


def test_a_catch_up_off_a_terminal_reports_only_once_it_takes_a_while(
        sagas_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(SagaProjection, "__init__", small_batches(SagaProjection.__init__))
    assert main([*LIST, "--store", sagas_url]) == 0
    assert capsys.readouterr().err == ""  # quick: nothing
    with open_store(sagas_url) as store:
        store.documents("sagas").clear()  # stale again
    monkeypatch.setattr(_sagas_cli, "PROGRESS_AFTER", 0.0)  # as if it took long
    assert main([*LIST, "--store", sagas_url]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[0].startswith("choreo: updating the saga projection: 20/")
    assert "\r" not in "".join(lines)


def small_batches(init):  # type: ignore[no-untyped-def]
    """SagaProjection.__init__ with batches of 20 events, so a small log takes several."""
    def patched(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **{**kwargs, "batch_size": 20})
    return patched
