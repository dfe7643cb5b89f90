"""Notification: tells the customer the order is on its way, or that it was cancelled.

Canvas
- handles: step `send_confirmation` on `ShipmentCreated`; its compensation.
- publishes: `ConfirmationSent`, `CancellationNoticeSent` (compensation).
- subscribes to: `ShipmentCreated`, and every failure of the saga (by outcome).
"""

from __future__ import annotations

from choreo import Aggregate, Context, Service, event
from services.contracts import CancellationNoticeSent, ConfirmationSent, ShipmentCreated

service = Service("notification")


class Outbox(Aggregate):
    """The messages sent to one customer about one order."""

    @event("Opened")
    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        self.sent: list[str] = []

    @event("Sent")
    def send(self, kind: str) -> None:
        self.sent.append(kind)


@service.step("send_confirmation", on=ShipmentCreated)
def confirm(shipped: ShipmentCreated, ctx: Context) -> ConfirmationSent:
    ctx.create(Outbox, shipped.order_id, customer_id=shipped.customer_id).send("confirmation")
    return ConfirmationSent(order_id=shipped.order_id, customer_id=shipped.customer_id)


@service.compensation("send_confirmation")
def notify_cancelled(done: ConfirmationSent, ctx: Context) -> CancellationNoticeSent:
    ctx.load(Outbox, done.order_id).send("cancellation")
    return CancellationNoticeSent(order_id=done.order_id, customer_id=done.customer_id)
