"""Orders: starts the order-fulfilment saga and ends it.

Canvas
- handles: `place_order` (starts the saga with `OrderPlaced`).
- publishes: `OrderPlaced`, `OrderConfirmed`, `OrderCancelled`.
- subscribes to: every step outcome of the saga (completions, failures, compensations).
- The order is confirmed when the customer is notified, and cancelled once every
  step that completed has been compensated.
- deadline `fulfilment`: an order neither confirmed nor cancelled within
  `$CHOREO_FULFILMENT_DEADLINE_S` seconds (default 120) times out (`OrderTimedOut`),
  which fails the saga; an operator's `choreo dlq compensate` does the same.
"""

from __future__ import annotations

import os
from datetime import timedelta

from choreo import Aggregate, CompensationForced, Context, Event, Service, event
from services.contracts import (
    CancellationNoticeSent,
    ConfirmationSent,
    ItemsReleased,
    ItemsReserved,
    OrderCancelled,
    OrderConfirmed,
    OrderPlaced,
    OrderTimedOut,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentRejected,
)

service = Service("orders", starts=[OrderPlaced])

FAILURE_REASONS = {
    OutOfStock: "out of stock", PaymentDeclined: "payment declined", ShipmentRejected: "address undeliverable",
    OrderTimedOut: "fulfilment deadline passed",
}
FULFILMENT_DEADLINE = timedelta(seconds=float(os.environ.get("CHOREO_FULFILMENT_DEADLINE_S", "120")))


class Order(Aggregate):
    """An order and what the orders service has seen of its saga."""

    @event("Placed")
    def __init__(self, order_id: str, amount: int) -> None:
        self.order_id = order_id
        self.amount = amount
        self.status = "placed"
        self.completed: list[str] = []
        self.compensated: list[str] = []
        self.failure: str | None = None

    @event("StepCompleted")
    def step_completed(self, step: str) -> None:
        self.completed.append(step)

    @event("StepFailed")
    def step_failed(self, step: str, reason: str) -> None:
        self.failure = self.failure or f"{step}: {reason}"

    @event("StepCompensated")
    def step_compensated(self, step: str) -> None:
        self.compensated.append(step)

    @event("Confirmed")
    def confirm(self) -> None:
        self.status = "confirmed"

    @event("Cancelled")
    def cancel(self) -> None:
        self.status = "cancelled"

    @property
    def fully_compensated(self) -> bool:
        """Whether the saga failed and every completed step has been compensated."""
        return self.failure is not None and set(self.completed) <= set(self.compensated)


@service.on(OrderPlaced)
def open_order(placed: OrderPlaced, ctx: Context) -> None:
    ctx.create(Order, ctx.saga_id, order_id=placed.order_id, amount=placed.amount)


@service.deadline("fulfilment", start_on=OrderPlaced, cancel_on=[OrderConfirmed, OrderCancelled],
                  after=FULFILMENT_DEADLINE)
def fulfilment_overdue(placed: OrderPlaced, ctx: Context) -> OrderTimedOut | None:
    """Fail the saga of an order that is still open when its fulfilment deadline passes."""
    order = ctx.find(Order, ctx.saga_id)
    if order is not None and order.status != "placed":
        return None  # it ended just before the deadline; its end event cancels the timer next
    return OrderTimedOut(order_id=placed.order_id, reason=f"not fulfilled within {FULFILMENT_DEADLINE}")


def follow(event: Event, ctx: Context) -> Event | None:
    """Record a step outcome on the order; confirm or cancel the order when the saga is over."""
    order = ctx.load(Order, ctx.saga_id)
    step, outcome = ctx.envelope.step or "", ctx.envelope.outcome
    if outcome == "completed":
        order.step_completed(step)
    elif outcome == "failed":
        if isinstance(event, CompensationForced):
            order.step_failed(step, f"forced by operator: {event.reason}")
        else:
            order.step_failed(step, FAILURE_REASONS.get(type(event), "failed"))
    elif outcome == "compensated":
        order.step_compensated(step)
    if order.status != "placed":
        return None
    if isinstance(event, ConfirmationSent) and order.failure is None:
        order.confirm()
        return OrderConfirmed(order_id=order.order_id, amount=order.amount)
    if order.fully_compensated:
        order.cancel()
        return OrderCancelled(order_id=order.order_id, reason=order.failure or "", compensated=order.compensated)
    return None


for _type in (
    ItemsReserved, PaymentCaptured, ShipmentCreated, ConfirmationSent,
    OutOfStock, PaymentDeclined, ShipmentRejected, OrderTimedOut, CompensationForced,
    ItemsReleased, PaymentRefunded, ShipmentCancelled, CancellationNoticeSent,
):
    service.on(_type)(follow)
