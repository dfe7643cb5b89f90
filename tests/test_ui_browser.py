"""The console in a real browser: `choreo ui` as its own process, Debian's chromium driven by Playwright.

Screenshots of every page are saved under the test's tmp_path (`screens/`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ui_store import PARKED_ORDER, PARKED_SAGA, fill, run_services

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

ROOT = Path(__file__).parent.parent
TOKEN = "s3cret-token"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(the console's base URL, the store's URL): `choreo ui` serving a store filled by the demo."""
    url = fill(tmp_path / "choreo.db")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CHOREO_STORE", "CHOREO_SYSTEM", "CHOREO_UI_TOKEN")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreo", "ui", "--store", url, "--system", "services:system", "--port", str(port),
         "--token", TOKEN], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/sagas", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    pytest.fail(f"choreo ui did not start: {err}")
                time.sleep(0.1)
        yield base, url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


@pytest.mark.slow
def test_an_operator_finds_a_failed_saga_and_retries_a_parked_event(console: tuple[str, str], page: object,
                                                                     tmp_path: Path) -> None:
    base, store_url = console
    screens = tmp_path / "screens"
    screens.mkdir()
    expect = playwright_api.expect
    p = page  # a playwright Page

    def shot(name: str) -> None:
        p.screenshot(path=str(screens / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]

    # the overview: counts by state; the filters find the failed sagas
    p.goto(base + "/")
    expect(p.locator(".count.failed b")).not_to_have_text("0")
    shot("1-sagas")
    p.select_option("select[name=state]", "failed")
    p.click("form.filters button[type=submit]")
    expect(p).to_have_url(f"{base}/sagas?state=failed")  # the empty filters stay out
    rows = p.locator("table.sagas tbody tr")
    expect(rows.first).to_be_visible()
    for i in range(rows.count()):
        expect(rows.nth(i).locator(".badge")).to_have_text("failed")
    shot("2-sagas-failed")

    # a saga whose shipment failed: its page shows the failing step, the cause and both compensations
    rows.filter(has_text="address undeliverable").first.locator("a.saga-link").click()
    expect(p.locator("h1 .badge")).to_have_text("failed")
    expect(p.locator("dd.cause")).to_contain_text("create_shipment")
    expect(p.locator("dd.cause")).to_contain_text("address undeliverable")
    steps = p.locator("table.steps")
    expect(steps.locator("tr.step.failed")).to_contain_text("create_shipment")
    expect(steps.locator("tr.step.compensated")).to_have_count(2)
    expect(steps.locator("tr.step.compensated").nth(0)).to_contain_text("reserve_inventory")
    expect(steps.locator("tr.step.compensated").nth(1)).to_contain_text("process_payment")
    diagram = p.locator(".diagram svg.sequence")
    expect(diagram.locator("g.event.failed")).to_contain_text("ShipmentRejected")
    expect(diagram.locator("g.event.compensated")).to_have_count(2)
    expect(p.locator(".causation")).to_contain_text("ItemsReleased")
    expect(p.locator(".causation")).to_contain_text("PaymentRefunded")
    shot("3-saga-failed")

    # the as-of control shows the saga before its failure
    first_failed = diagram.locator("g.event.failed").first.get_attribute("data-position")
    p.fill("input.asof-number", str(int(first_failed) - 1))
    p.click("form.asof button[type=submit]")
    expect(p.locator(".asof-banner")).to_contain_text(f"position {int(first_failed) - 1}")
    expect(p.locator("h1 .badge")).not_to_have_text("failed")
    expect(p.locator("dd.cause")).to_have_text("-")
    shot("4-saga-as-of")

    # the parked saga, found by its business key
    p.goto(base + "/sagas")
    p.fill("input[name=q]", PARKED_ORDER)
    p.press("input[name=q]", "Enter")
    p.locator("a.saga-link", has_text=PARKED_SAGA).click()
    expect(p.locator("table.steps tr.step", has_text="process_payment")).to_contain_text("ProviderTimeout")
    expect(p.locator("h1 .badge")).to_have_text("running")
    shot("5-saga-parked")

    # dead letters: the list, the detail, and a retry refused without the token
    p.goto(base + "/dead-letters")
    letter = p.locator("table.letters tr", has_text=PARKED_SAGA).locator("a.letter-link")
    expect(letter).to_have_count(1)
    shot("6-dead-letters")
    letter.click()
    expect(p.locator("pre.error")).to_contain_text("ProviderTimeout")
    expect(p.locator("pre.envelope")).to_contain_text(PARKED_ORDER)
    shot("7-dead-letter")
    p.click("text=Retry…")
    expect(p.locator("h1")).to_contain_text("Retry payment:")
    shot("8-confirm-retry")
    p.fill("input[name=token]", "not-the-token")
    p.click("form.confirm button[type=submit]")
    expect(p.locator("h1")).to_have_text("Refused: wrong token")
    shot("9-refused")
    p.go_back()

    # with the token, after the confirmation step: the same event as `choreo dlq retry`
    p.fill("input[name=reason]", "provider is back")
    p.fill("input[name=token]", TOKEN)
    p.click("form.confirm button[type=submit]")
    expect(p.locator(".message")).to_contain_text("retry of payment:")
    expect(p.locator(".message")).to_contain_text("requested")
    shot("10-retry-requested")

    # the saga page updates live while the services run the retried event
    p.click("text=the saga")
    expect(p.locator("h1 .badge")).to_have_text("running")
    run_services(store_url)
    expect(p.locator("h1 .badge")).to_have_text("completed", timeout=15_000)
    expect(p.locator("table.steps tr.step.completed")).to_have_count(4)
    expect(p.locator(".causation")).to_contain_text("choreo.RetryRequested")
    expect(p.locator(".causation")).to_contain_text("choreo.DeadLetterResolved")
    shot("11-saga-completed")

    # the system: services, events, steps and compensations from the handlers
    p.goto(base + "/system")
    graph = p.locator("svg.graph")
    for name in ("orders", "inventory", "payment", "shipping", "notification", "OrderPlaced", "PaymentRefunded"):
        expect(graph).to_contain_text(name)
    expect(p.locator("ol.saga-steps li")).to_have_count(4)
    shot("12-system")
