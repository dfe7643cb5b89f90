"""A store for the console's tests: the demo's sagas (completed and failed), plus one saga parked in payment."""

from __future__ import annotations

from pathlib import Path

from choreo import RetryPolicy, Runner, open_store
from services import payment, system
from services.contracts import OrderPlaced
from services.demo import run_demo

PARKED_SAGA = "saga-parked-1"
PARKED_ORDER = "order-flaky-ui"


def fill(path: Path) -> str:
    """Run the demo (30 orders, seed 7: completed and failed sagas) on a new SQLite store, then park one
    saga: its payment provider times out once and payment gives up at the first try. Return the store's URL.

    The provider's second call (the retry, in this process) succeeds, so retrying the parked event completes it.
    """
    url = f"sqlite:///{path}"
    summary = run_demo(url, orders=30, seed=7)
    assert summary["states"].get("failed") and summary["compensated_steps"].get("process_payment"), summary
    store = open_store(url)
    kept = payment.service.retry
    payment.service.retry = RetryPolicy(max_attempts=1, retry_on=(TimeoutError,))
    payment._provider_calls.pop(PARKED_ORDER, None)  # the provider forgets an earlier test's call: it times out
    try:
        system.start(store, OrderPlaced(order_id=PARKED_ORDER, customer_id="flaky-ui", sku="widget", quantity=1,
                                        amount=700, address="1 Main St"), saga_id=PARKED_SAGA)
        Runner(system, store).run_until_idle()
        (letter,) = store.service("payment").dead_letters("parked")
        assert letter.saga_id == PARKED_SAGA
    finally:
        payment.service.retry = kept
        store.close()
    return url


def run_services(url: str) -> None:
    """Run every service of the example in this process until none has work."""
    store = open_store(url)
    try:
        Runner(system, store).run_until_idle()
    finally:
        store.close()
