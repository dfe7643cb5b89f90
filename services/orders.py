"""Orders: starts the order-fulfilment saga; choreo tells it when the saga ended.

Canvas
- handles: `place_order` (starts the saga with `OrderPlaced`).
- publishes: `OrderPlaced`, `OrderConfirmed`, `OrderCancelled`, `OrderTimedOut`.
- subscribes to: `OrderPlaced`; the saga's end, from choreo (`SagaCompleted`, `SagaFailed`).
- The order is confirmed once every step of `ORDER_SAGA` completed, and cancelled once
  the saga failed and every step that completed was compensated. choreo tracks the step
  outcomes in the orders service's own record of each saga and calls `confirm` or
  `cancel` exactly once per order, never both.
- deadline `fulfilment`: an order whose saga has not ended within
  `$CHOREO_FULFILMENT_DEADLINE_S` seconds (default 120) times out (`OrderTimedOut`),
  which fails the saga; an operator's `choreo dlq compensate` does the same. The
  deadline is cancelled when the saga ends, and fires only after the service has read
  what is already in the log (so an order that completed while orders was down is
  confirmed, not timed out).
"""

from __future__ import annotations

import os
from datetime import timedelta

from choreo import Aggregate, Context, SagaCompleted, SagaDefinition, SagaFailed, Service, event
from services.contracts import (
    OrderCancelled,
    OrderConfirmed,
    OrderPlaced,
    OrderTimedOut,
    OutOfStock,
    PaymentDeclined,
    ShipmentRejected,
)

ORDER_SAGA = SagaDefinition(
    name="order_fulfilment",
    start=OrderPlaced,
    steps=("reserve_inventory", "process_payment", "create_shipment", "send_confirmation"),
    end=(OrderConfirmed, OrderCancelled),
)
"""The saga: its start event, its steps in order, and the events that end it."""

service = Service("orders", starts=[OrderPlaced])

#: What the customer is told, by the type of the event that failed the saga.
FAILURE_REASONS = {
    OutOfStock.event_type: "out of stock",
    PaymentDeclined.event_type: "payment declined",
    ShipmentRejected.event_type: "address undeliverable",
    OrderTimedOut.event_type: "fulfilment deadline passed",
}
FULFILMENT_DEADLINE = timedelta(seconds=float(os.environ.get("CHOREO_FULFILMENT_DEADLINE_S", "120")))


class Order(Aggregate):
    """An order: placed, then confirmed or cancelled."""

    @event("Placed")
    def __init__(self, order_id: str, amount: int) -> None:
        self.order_id = order_id
        self.amount = amount
        self.status = "placed"

    @event("Confirmed")
    def confirm(self) -> None:
        self.status = "confirmed"

    @event("Cancelled")
    def cancel(self) -> None:
        self.status = "cancelled"


@service.on(OrderPlaced)
def open_order(placed: OrderPlaced, ctx: Context) -> None:
    ctx.create(Order, ctx.saga_id, order_id=placed.order_id, amount=placed.amount)


@service.saga_completed(ORDER_SAGA)
def confirm(done: SagaCompleted, ctx: Context) -> OrderConfirmed:
    """Every step completed: confirm the order."""
    order = ctx.load(Order, ctx.saga_id)
    order.confirm()
    return OrderConfirmed(order_id=order.order_id, amount=order.amount)


@service.saga_failed(ORDER_SAGA)
def cancel(failed: SagaFailed, ctx: Context) -> OrderCancelled:
    """The saga failed and every completed step is undone: cancel the order."""
    order = ctx.load(Order, ctx.saga_id)
    order.cancel()
    if failed.failure_type == "choreo.CompensationForced":
        why = f"forced by operator: {failed.reason}"
    else:
        why = FAILURE_REASONS.get(failed.failure_type, failed.reason or "failed")
    reason = f"{failed.failed_step}: {why}" if failed.failed_step else why
    return OrderCancelled(order_id=order.order_id, reason=reason, compensated=failed.compensated)


@service.deadline("fulfilment", start_on=OrderPlaced, after=FULFILMENT_DEADLINE)
def fulfilment_overdue(placed: OrderPlaced, ctx: Context) -> OrderTimedOut:
    """Fail the saga of an order that has not ended when its fulfilment deadline passes."""
    return OrderTimedOut(order_id=placed.order_id, reason=f"not fulfilled within {FULFILMENT_DEADLINE}")
