"""Audits of the example's invariants, read from the log and the services' own stores."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from choreo import EventStore
from choreo.aggregates import load_aggregate
from services import inventory, payment
from services.contracts import OrderCancelled, OrderConfirmed

END_TYPES = {OrderConfirmed.event_type: "completed", OrderCancelled.event_type: "failed"}


@dataclass
class SagaFacts:
    """What the log says about one saga of the example."""

    order: dict[str, object] = field(default_factory=dict)
    state: str = "running"
    cause: str | None = None
    completed: set[str] = field(default_factory=set)
    compensated: set[str] = field(default_factory=set)
    charged: int = 0
    refunded: int = 0
    captures: int = 0
    retries: int = 0


def read_facts(store: EventStore, saga_ids: set[str] | None = None) -> dict[str, SagaFacts]:
    """Scan the log once and return the facts of each saga (or only of `saga_ids`)."""
    facts: dict[str, SagaFacts] = defaultdict(SagaFacts)
    seen: set[str] = set()
    for batch in store.scan():
        for env in batch:
            if env.event_id in seen:
                continue  # a copy (Kafka: the relay sent it again after a crash); its effect happened once
            seen.add(env.event_id)
            if saga_ids is not None and env.saga_id not in saga_ids:
                continue
            f = facts[env.saga_id]
            payload = env.to_dict()["payload"]
            if env.type == "OrderPlaced":
                f.order = payload
            if env.type in END_TYPES:
                f.state = END_TYPES[env.type]
                if env.type == OrderCancelled.event_type:
                    f.cause = payload["reason"].split(": ", 1)[-1]
            if env.outcome == "completed" and env.step:
                f.completed.add(env.step)
            if env.outcome == "compensated" and env.step:
                f.compensated.add(env.step)
            if env.type == "PaymentCaptured":
                f.charged += payload["amount"]
                f.captures += 1
            if env.type == "choreo.HandlerRetried":
                f.retries += 1
            if env.type == "PaymentRefunded":
                f.refunded += payload["amount"]
    return dict(facts)


def check_invariants(store: EventStore, facts: dict[str, SagaFacts]) -> dict[str, bool]:
    """Check the example's invariants; return each check's name and whether it holds."""
    confirmed_qty: dict[str, int] = defaultdict(int)
    confirmed_paid: dict[str, int] = defaultdict(int)
    skus, customers = set(), set()
    for f in facts.values():
        skus.add(str(f.order.get("sku")))
        customers.add(str(f.order.get("customer_id")))
        if f.state == "completed":
            confirmed_qty[str(f.order["sku"])] += int(f.order["quantity"])  # type: ignore[call-overload]
            confirmed_paid[str(f.order["customer_id"])] += int(f.order["amount"])  # type: ignore[call-overload]
    money_per_order = all(
        f.charged - f.refunded == (int(f.order["amount"]) if f.state == "completed" else 0)  # type: ignore[call-overload]
        and f.captures <= 1
        for f in facts.values()
    )
    inv, pay = store.service("inventory"), store.service("payment")
    stock_ok = True
    for sku in skus:
        item = load_aggregate(inv, inventory.StockItem, sku)
        on_hand = item.on_hand if item else inventory.CATALOG.get(sku, 0)
        stock_ok &= on_hand >= 0 and on_hand == inventory.CATALOG.get(sku, 0) - confirmed_qty[sku]
    wallets_ok = True
    for customer in customers:
        wallet = load_aggregate(pay, payment.Wallet, customer)
        opening = payment.opening_balance(customer)
        balance = wallet.balance if wallet else opening
        wallets_ok &= balance == opening - confirmed_paid[customer]
    return {
        "every_saga_ended": all(f.state != "running" for f in facts.values()),
        "stock_never_negative_and_matches_confirmed": stock_ok,
        "charged_minus_refunded_equals_confirmed_per_order": money_per_order,
        "wallets_match_confirmed_orders": wallets_ok,
        "cancelled_orders_fully_compensated": all(
            f.completed <= f.compensated for f in facts.values() if f.state == "failed"
        ),
    }
