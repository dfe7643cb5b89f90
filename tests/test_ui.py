"""The console over plain HTTP (Starlette's TestClient): errors, the token, read-only reads, the CLI's events."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
with warnings.catch_warnings():  # Starlette 1.x: its TestClient will move to httpx2; it works with httpx as it is
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from choreo import SagaProjection, open_store  # noqa: E402
from choreo._ui_cli import is_loopback  # noqa: E402
from choreo.store import LogStore  # noqa: E402
from choreo.ui import create_app  # noqa: E402
from choreo.ui._graph import emitted_types  # noqa: E402
from choreo.ui.app import LOOPBACK_HOSTS  # noqa: E402
from services import payment, system  # noqa: E402
from tests.ui_store import PARKED_ORDER, PARKED_SAGA, fill  # noqa: E402

ROOT = Path(__file__).parent.parent
TOKEN = "t0ken"


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store filled by the demo plus one parked saga (shared: the tests that write use a copy)."""
    path = tmp_path_factory.mktemp("ui") / "choreo.db"
    fill(path)
    return path


@pytest.fixture
def store_path(filled: Path, tmp_path: Path) -> Path:
    """A copy of the filled store, for one test."""
    for suffix in ("", "-wal"):
        if Path(f"{filled}{suffix}").exists():
            shutil.copy(f"{filled}{suffix}", tmp_path / f"choreo.db{suffix}")
    return tmp_path / "choreo.db"


def client(path: Path, token: str | None = TOKEN, **options: object) -> TestClient:
    return TestClient(create_app(f"sqlite:///{path}", system, token=token, **options))  # type: ignore[arg-type]


@pytest.fixture
def http(store_path: Path) -> Iterator[TestClient]:
    with client(store_path) as c:
        yield c


def parked_ref(path: Path) -> tuple[str, int]:
    store = open_store(f"sqlite:///{path}", create=False)
    try:
        (letter,) = [d for d in store.service("payment").dead_letters("parked") if d.saga_id == PARKED_SAGA]
        return letter.service, letter.id or 0
    finally:
        store.close()


def last_event(path: Path) -> dict[str, object]:
    store = open_store(f"sqlite:///{path}", create=False)
    try:
        assert isinstance(store, LogStore)
        (env,) = store.read(store.last_position() - 1, 1)
        return {"type": env.type, "saga_id": env.saga_id, "service": env.service, "step": env.step,
                "outcome": env.outcome, "causation_id": env.causation_id, "payload": json.loads(env.payload),
                "position": env.position}
    finally:
        store.close()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for suffix in ("", "-wal"):
        p = Path(f"{path}{suffix}")
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


# -- pages and their errors ----------------------------------------------------------------------

def test_an_unknown_saga_is_a_404_page_that_names_it(http: TestClient) -> None:
    r = http.get("/sagas/no-such-saga")
    assert r.status_code == 404
    assert "text/html" in r.headers["content-type"]
    assert "no saga &#x27;no-such-saga&#x27;" in r.text
    assert http.get("/sagas/no-such-saga/compensate").status_code == 404
    assert http.get("/dead-letters/payment/999").status_code == 404
    assert http.get("/dead-letters/payment/1/explode").status_code == 404
    assert http.get("/nowhere").status_code == 404


@pytest.mark.parametrize(("query", "field"), [
    ("state=bogus", "state"), ("since=yesterday", "since"), ("until=2026-13-45", "until"),
    ("stuck_for=-3", "stuck_for"), ("stuck_for=soon", "stuck_for"), ("page=0", "page"), ("page=x", "page"),
    ("page=99", "page"),
])
def test_a_bad_filter_is_a_400_that_names_the_field(http: TestClient, query: str, field: str) -> None:
    r = http.get(f"/sagas?{query}")
    assert r.status_code == 400, r.text
    assert re.search(rf'<p class="message">{field}: ', r.text), r.text


def test_other_bad_values_are_400s_that_name_them(http: TestClient) -> None:
    r = http.get(f"/sagas/{PARKED_SAGA}?as_of=last-week")
    assert r.status_code == 400 and "as_of: expected a log position" in r.text
    r = http.get("/dead-letters?status=lost")
    assert r.status_code == 400 and "status: expected one of" in r.text


def test_the_filters_and_the_search_find_sagas(http: TestClient) -> None:
    failed = http.get("/sagas?state=failed").text
    rows = re.findall(r'<tr><td><a href="/sagas/([^"]+)" class="saga-link">', failed)
    assert rows and all(f"/sagas/{s}" in failed for s in rows)
    assert failed.count('<span class="badge failed">failed</span>') == len(rows)
    assert 'class="badge completed"' not in failed.split("<table", 1)[1]
    assert "No saga matches." in http.get("/sagas?state=failed&type=other_saga").text
    assert "No saga matches." in http.get("/sagas?since=2999-01-01").text
    # by business key (a field of the start event), and by saga id
    found = http.get(f"/sagas?q={PARKED_ORDER}").text
    assert re.findall(r'class="saga-link">([^<]+)<', found) == [PARKED_SAGA]
    r = http.get(f"/sagas?q={PARKED_SAGA}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sagas/{PARKED_SAGA}"


def test_the_console_shows_the_log_beyond_the_stored_projection_without_writing(store_path: Path) -> None:
    # the demo stored the projection; the parked saga came after it, and nothing updated it since
    store = open_store(f"sqlite:///{store_path}", create=False)
    try:
        assert SagaProjection(store, sagas=system.sagas).get(PARKED_SAGA) is None
    finally:
        store.close()
    before = digest(store_path)
    service, number = parked_ref(store_path)
    with client(store_path) as http:
        pages = ["/", "/sagas", "/sagas?state=running", f"/sagas?q={PARKED_ORDER}", f"/sagas/{PARKED_SAGA}",
                 f"/sagas/{PARKED_SAGA}?as_of=1", "/dead-letters", "/dead-letters?status=all",
                 f"/dead-letters/{service}/{number}", f"/dead-letters/{service}/{number}/retry",
                 f"/dead-letters/{service}/{number}/skip", f"/sagas/{PARKED_SAGA}/compensate", "/system",
                 "/static/console.css", "/static/console.js"]
        for page in pages:
            assert http.get(page).status_code == 200, page
        saga = http.get(f"/sagas/{PARKED_SAGA}").text
        assert '<span class="badge running">running</span>' in saga and "ProviderTimeout" in saga
        refused = http.post(f"/dead-letters/{service}/{number}/retry", data={"confirm": "yes"})
        assert refused.status_code == 403
    assert digest(store_path) == before  # not a byte written, not even the projection's catch-up
    assert not Path(f"{store_path}-journal").exists()


# -- actions: the token, the confirmation, and the CLI's events -----------------------------------

def test_a_write_without_the_token_is_refused_and_writes_nothing(http: TestClient, store_path: Path) -> None:
    service, number = parked_ref(store_path)
    before = last_event(store_path)["position"]
    action = f"/dead-letters/{service}/{number}/retry"
    r = http.post(action, data={"confirm": "yes", "reason": "r"})
    assert r.status_code == 403 and "needs the console&#x27;s token" in r.text and "nothing was written" in r.text
    r = http.post(action, data={"confirm": "yes", "token": "guess"})
    assert r.status_code == 403 and "Refused: wrong token" in r.text
    r = http.post(action, data={"token": TOKEN})  # not through the confirmation page
    assert r.status_code == 400 and "confirm: " in r.text
    r = http.post(f"/dead-letters/{service}/{number}/skip", data={"confirm": "yes", "token": TOKEN})
    assert r.status_code == 400 and "reason: skipping a parked event needs a reason" in r.text
    r = http.post(f"/sagas/{PARKED_SAGA}/compensate", data={"confirm": "yes"})
    assert r.status_code == 403
    assert last_event(store_path)["position"] == before


def test_a_console_without_a_token_is_read_only(store_path: Path) -> None:
    service, number = parked_ref(store_path)
    before = last_event(store_path)["position"]
    with client(store_path, token=None) as http:
        confirm = http.get(f"/dead-letters/{service}/{number}/retry").text
        assert "This console is read-only" in confirm and "<form method=\"post\"" not in confirm
        for anything in ("", TOKEN):
            r = http.post(f"/dead-letters/{service}/{number}/retry", data={"confirm": "yes", "token": anything})
            assert r.status_code == 403 and "read-only" in r.text
    assert last_event(store_path)["position"] == before


@pytest.mark.slow
def test_each_action_appends_the_same_event_as_the_cli(store_path: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    twin.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{store_path}{suffix}").exists():
            shutil.copy(f"{store_path}{suffix}", twin / f"choreo.db{suffix}")
    service, number = parked_ref(store_path)
    ref = f"{service}:{number}"

    def cli(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "choreo", "dlq", *args, "--store", f"sqlite:///{twin}/choreo.db"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    def same(mine: dict[str, object], theirs: dict[str, object]) -> None:
        assert {k: v for k, v in mine.items() if k != "position"} == {k: v for k, v in theirs.items() if k != "position"}

    with client(store_path) as http:
        r = http.post(f"/dead-letters/{service}/{number}/retry", data={"confirm": "yes", "token": TOKEN,
                                                                        "reason": "provider is back"})
        assert r.status_code == 200 and f"retry of {ref} requested (saga {PARKED_SAGA})" in r.text
        cli("retry", ref, "--reason", "provider is back")
        mine = last_event(store_path)
        assert mine["type"] == "choreo.RetryRequested" and mine["service"] == "operator"
        same(mine, last_event(twin / "choreo.db"))

        r = http.post(f"/dead-letters/{service}/{number}/skip", data={"confirm": "yes", "token": TOKEN,
                                                                       "reason": "handled by hand"})
        assert r.status_code == 200 and f"skip of {ref} requested" in r.text
        cli("skip", ref, "--reason", "handled by hand")
        same(last_event(store_path), last_event(twin / "choreo.db"))

        r = http.post(f"/sagas/{PARKED_SAGA}/compensate", headers={"Authorization": f"Bearer {TOKEN}"},
                      data={"confirm": "yes", "reason": "customer gave up"})
        assert r.status_code == 200 and f"compensation of saga {PARKED_SAGA} requested" in r.text
        cli("compensate", PARKED_SAGA, "--reason", "customer gave up")
        mine = last_event(store_path)
        assert mine["type"] == "choreo.CompensationRequested"
        same(mine, last_event(twin / "choreo.db"))

        # refused like the CLI: a saga that ended cannot be compensated
        completed = re.findall(r'class="saga-link">([^<]+)<', http.get("/sagas?state=completed").text)[0]
        r = http.post(f"/sagas/{completed}/compensate", data={"confirm": "yes", "token": TOKEN, "reason": "x"})
        assert r.status_code == 409 and "already completed" in r.text and "nothing was written" in r.text


# -- security and packaging ----------------------------------------------------------------------

def test_a_loopback_console_refuses_other_host_names(store_path: Path) -> None:
    with client(store_path, allowed_hosts=LOOPBACK_HOSTS) as http:
        assert http.get("/sagas", headers={"host": "127.0.0.1:8765"}).status_code == 200
        assert http.get("/sagas", headers={"host": "evil.example:8765"}).status_code == 400


def test_pages_load_nothing_from_elsewhere(http: TestClient) -> None:
    for page in ("/sagas", f"/sagas/{PARKED_SAGA}", "/dead-letters", "/system"):
        html = http.get(page).text
        assert not re.search(r'(src|href)="(https?:)?//', html), page
        assert '<link rel="stylesheet" href="/static/console.css">' in html
        assert '<script src="/static/console.js">' in html


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.4", "example.com"]))


def test_the_graph_reads_what_handlers_emit_from_their_annotations() -> None:
    assert emitted_types(payment.charge) == ["PaymentCaptured"]
    assert emitted_types(payment.refund) == ["PaymentRefunded"]
    assert emitted_types(lambda event, ctx: None) == []


def test_choreo_ui_refuses_a_public_address_without_a_token_and_a_missing_store(tmp_path: Path) -> None:
    env_cmd = [sys.executable, "-m", "choreo", "ui", "--system", "services:system"]
    public = subprocess.run([*env_cmd, "--host", "0.0.0.0", "--store", f"sqlite:///{tmp_path}/x.db"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=_env())
    assert public.returncode == 2
    assert "--host 0.0.0.0 is not a loopback address: give --token" in public.stderr
    missing = subprocess.run([*env_cmd, "--store", f"sqlite:///{tmp_path}/missing.db", "--port", "1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, env=_env())
    assert missing.returncode == 1 and "no such choreo store" in missing.stderr
    assert not (tmp_path / "missing.db").exists()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("CHOREO_STORE", "CHOREO_SYSTEM", "CHOREO_UI_TOKEN")}


@pytest.mark.slow
def test_the_console_reads_a_kafka_store(kafka_url: str) -> None:
    from services.demo import plan, run_demo

    open_store(kafka_url).close()  # the topic
    summary = run_demo(kafka_url, orders=12, seed=7, timeout=120)
    assert summary["ended"] == 12, summary
    planned = plan(12, 7)
    failed = next(saga_id for saga_id, _, state, _ in planned if state == "failed")
    with TestClient(create_app(kafka_url, system, token=TOKEN)) as http:
        overview = http.get("/sagas")
        assert overview.status_code == 200
        assert len(re.findall(r'class="saga-link"', overview.text)) == 12
        saga = http.get(f"/sagas/{failed}")
        assert http.get("/dead-letters").status_code == 200
        assert http.get("/system").status_code == 200
    # what the console shows is what the projection, updated by a writer, says
    store = open_store(kafka_url)
    try:
        projection = SagaProjection(store, sagas=system.sagas)
        projection.update()
        expected = projection.get(failed)
        counts = projection.counts()
    finally:
        store.close()
    assert expected is not None and expected["cause"]
    assert saga.status_code == 200 and f'<span class="badge {expected["state"]}">' in saga.text
    assert expected["cause"].replace("'", "&#x27;") in saga.text
    for state, n in counts.items():
        assert f'<b>{n}</b><span>{state}</span>' in overview.text


def test_choreo_and_its_cli_load_no_web_framework_until_choreo_ui_runs() -> None:
    code = ("import sys, choreo, choreo.cli; choreo.cli.build_parser(); "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'choreo.ui') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
