"""The example's HTTP front door (services/api.py), driven through its ASGI app with httpx.

Each test runs the app's lifespan (asgi-lifespan's `LifespanManager`), so the store is
opened and the services run in the test's event loop, as under uvicorn; the store is
a real SQLite file in tmp_path.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

import choreo
from choreo import Runner, StoreLocked, WiringError, open_store
from services import system
from services.api import PlaceOrder, app
from services.checks import check_invariants, read_facts
from services.contracts import OrderPlaced

pytestmark = pytest.mark.anyio

ORDER = {"order_id": "o-1", "customer_id": "ada", "sku": "widget", "quantity": 2, "amount": 1500,
         "address": "1 Main St"}
#: an order of each kind: (its changes to ORDER, then its saga's state, cause and step statuses once it ended)
EXPECTED: dict[str, tuple[dict[str, Any], str, str | None, dict[str, str]]] = {
    "happy": ({}, "completed", None, dict.fromkeys(
        ["reserve_inventory", "process_payment", "create_shipment", "send_confirmation"], "completed")),
    "out of stock": ({"sku": "rare-gem"}, "failed", "reserve_inventory: OutOfStock", {
        "reserve_inventory": "failed", "process_payment": "pending", "create_shipment": "pending",
        "send_confirmation": "pending"}),
    "declined": ({"customer_id": "broke-1"}, "failed", "process_payment: PaymentDeclined: insufficient funds", {
        "reserve_inventory": "compensated", "process_payment": "failed", "create_shipment": "pending",
        "send_confirmation": "pending"}),
    "undeliverable": ({"address": "the moon"}, "failed", "create_shipment: ShipmentRejected: address undeliverable", {
        "reserve_inventory": "compensated", "process_payment": "compensated", "create_shipment": "failed",
        "send_confirmation": "pending"}),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    monkeypatch.setenv("CHOREO_STORE", url)
    monkeypatch.delenv("CHOREO_API_SERVICES", raising=False)
    return url


@asynccontextmanager
async def serving() -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan entered, as a server would) and a client that talks to it."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders.test") as client:
            yield client


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serving() as client:
        yield client


async def place(client: httpx.AsyncClient, **changes: Any) -> httpx.Response:
    response = await client.post("/orders", json={**ORDER, **changes})
    assert response.status_code == 202, response.text
    return response


async def until_ended(client: httpx.AsyncClient, location: str) -> dict[str, Any]:
    """GET the saga until it completed or failed (the bound only keeps a broken run from hanging)."""
    async with asyncio.timeout(120):
        while True:
            response = await client.get(location)
            assert response.status_code == 200, response.text
            if response.json()["state"] in ("completed", "failed"):
                return response.json()  # type: ignore[no-any-return]
            await asyncio.sleep(0.02)


def with_store(url: str, fn: Callable[[Any], Any]) -> Any:
    store = open_store(url)
    try:
        return fn(store)
    finally:
        store.close()


async def test_each_kind_of_order_ends_as_its_saga_says(client: httpx.AsyncClient, store_url: str) -> None:
    placed = await asyncio.gather(*(place(client, order_id=f"o-{i}", **changes)
                                    for i, (changes, *_) in enumerate(EXPECTED.values())))
    for response in placed:
        saga_id = response.json()["saga_id"]
        assert response.headers["location"] == f"http://orders.test/orders/{saga_id}"

    ended = [await until_ended(client, r.headers["location"]) for r in placed]

    for (kind, (_, state, cause, steps)), saga, response in zip(EXPECTED.items(), ended, placed):
        assert saga["saga_id"] == response.json()["saga_id"], kind
        assert (saga["state"], saga["cause"]) == (state, cause), kind
        assert {name: step["status"] for name, step in saga["steps"].items()} == steps, kind
        assert saga["started_at"] and saga["ended_at"], kind
    # the services ran for real, in the app's loop: the example's invariants hold in its store
    facts = await asyncio.to_thread(with_store, store_url, read_facts)
    assert all((await asyncio.to_thread(with_store, store_url, lambda s: check_invariants(s, facts))).values())


async def test_a_saga_just_started_is_found_at_its_location(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_API_SERVICES", "none")  # nothing moves it on: it stays as it started
    async with serving() as client:
        response = await place(client)
        saga = (await client.get(response.headers["location"])).json()
    assert (saga["state"], saga["cause"]) == ("started", None)
    assert {step["status"] for step in saga["steps"].values()} == {"pending"}


async def test_services_can_run_elsewhere(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_API_SERVICES", "none")
    async with serving() as client:
        location = (await place(client)).headers["location"]
        # the services run in another runner on the same store (as `choreo run` processes would)
        await asyncio.to_thread(with_store, store_url, lambda store: Runner(system, store).run_until_idle())
        saga = await until_ended(client, location)
    assert saga["state"] == "completed"


async def test_some_services_in_the_app(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_API_SERVICES", "orders, inventory")
    async with serving() as client:
        location = (await place(client, sku="rare-gem")).headers["location"]
        saga = await until_ended(client, location)  # orders and inventory are all this saga needs
    assert (saga["state"], saga["cause"]) == ("failed", "reserve_inventory: OutOfStock")


async def test_an_unknown_service_fails_the_start(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_API_SERVICES", "orders,billing")
    with pytest.raises(WiringError, match="billing"):
        async with serving():
            pass


async def test_the_saga_id_can_be_given_and_a_repeat_starts_nothing(client: httpx.AsyncClient,
                                                                    store_url: str) -> None:
    first = await place(client, saga_id="order-7")
    again = await place(client, saga_id="order-7", order_id="o-other")
    assert first.json() == again.json() == {"saga_id": "order-7"}
    assert first.headers["location"].endswith("/orders/order-7")
    assert (await until_ended(client, first.headers["location"]))["state"] == "completed"

    facts = await asyncio.to_thread(with_store, store_url, read_facts)
    assert list(facts) == ["order-7"]
    assert facts["order-7"].order["order_id"] == "o-1"  # the first order stands


async def test_an_unknown_saga_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders/no-such-saga")
    assert response.status_code == 404
    assert "no-such-saga" in response.json()["detail"]


@pytest.mark.parametrize(("body", "field"), [
    ({k: v for k, v in ORDER.items() if k != "sku"}, "sku"),
    ({**ORDER, "quantity": "two"}, "quantity"),
    ({**ORDER, "quantity": 0}, "quantity"),
    ({**ORDER, "amount": -1}, "amount"),
    ({**ORDER, "colour": "red"}, "colour"),
    ({**ORDER, "saga_id": "a/b"}, "saga_id"),
], ids=["missing", "not-a-number", "zero-quantity", "negative-amount", "unknown-field", "bad-saga-id"])
async def test_a_bad_body_is_422_naming_the_field(client: httpx.AsyncClient, store_url: str,
                                                  body: dict[str, Any], field: str) -> None:
    response = await client.post("/orders", json=body)
    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["body", field]]
    # nothing was started
    assert await asyncio.to_thread(with_store, store_url, read_facts) == {}


def test_the_body_has_every_field_of_the_event() -> None:
    """The API's body is its own model (with its own limits): it must not drift from `OrderPlaced`."""
    assert set(PlaceOrder.model_fields) == {*OrderPlaced.model_fields, "saga_id"}


def test_choreo_itself_imports_no_web_framework() -> None:
    """The `api` extra is the example's: the wheel (only `choreo`) must work without it.

    The console (`choreo/ui/`, and `choreo ui` which imports it when run) is the `ui` extra's:
    tests/test_ui.py checks that importing choreo and its CLI loads none of it.
    """
    web = re.compile(r"^\s*(from|import)\s+(fastapi|starlette|uvicorn|httpx|asgi_lifespan)\b", re.M)
    root = Path(choreo.__file__).parent
    console = {root / "_ui_cli.py", *(root / "ui").rglob("*.py")}
    assert [p.name for p in root.rglob("*.py") if p not in console and web.search(p.read_text())] == []


async def test_a_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/orders", content=b"order please", headers={"content-type": "application/json"})
    assert response.status_code == 422


async def test_a_store_that_is_unavailable_is_503(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def locked(*args: object, **kwargs: object) -> str:
        raise StoreLocked("orders.db: database is locked")

    monkeypatch.setattr(system, "start", locked)
    response = await client.post("/orders", json=ORDER)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "locked" in response.json()["detail"]


async def test_store_calls_never_run_on_the_event_loop(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's requests and its services call the store from worker threads only.

    A SQLite store opens one connection per thread, on that thread's first store call:
    so no connection opened on this thread (the loop's) means no store call made on it.
    """
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    connect = sqlite3.connect

    def spy(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == loop_thread:
            on_loop.append(str(args[0]))
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", spy)
    async with serving() as client:
        placed = await asyncio.gather(*(place(client, order_id=f"o-{i}", **changes)
                                        for i, (changes, *_) in enumerate(EXPECTED.values())))
        for response in placed:
            await until_ended(client, response.headers["location"])
        assert (await client.get("/orders/no-such-saga")).status_code == 404
    assert on_loop == []
