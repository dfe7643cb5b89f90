"""Shipping: books a shipment and cancels it when the saga fails.

Canvas
- handles: step `create_shipment` on `PaymentCaptured`; its compensation.
- publishes: `ShipmentCreated`, `ShipmentRejected` (failure), `ShipmentCancelled` (compensation).
- subscribes to: `PaymentCaptured`, and every failure of the saga (by outcome).
"""

from __future__ import annotations

from choreo import Aggregate, Context, Service, StepFailed, event
from services.contracts import PaymentCaptured, ShipmentCancelled, ShipmentCreated, ShipmentRejected

#: Addresses no carrier delivers to.
UNDELIVERABLE = frozenset({"nowhere", "the moon"})

service = Service("shipping")


class Shipment(Aggregate):
    """A shipment booked for an order."""

    @event("Booked")
    def __init__(self, order_id: str, address: str) -> None:
        self.order_id = order_id
        self.address = address
        self.cancelled = False

    @event("Cancelled")
    def cancel(self) -> None:
        self.cancelled = True


@service.step("create_shipment", on=PaymentCaptured, emits=[ShipmentRejected])
def book(paid: PaymentCaptured, ctx: Context) -> ShipmentCreated:
    if paid.address in UNDELIVERABLE:
        raise StepFailed(
            ShipmentRejected(order_id=paid.order_id, address=paid.address, reason="address undeliverable")
        )
    shipment = ctx.create(Shipment, paid.order_id, order_id=paid.order_id, address=paid.address)
    return ShipmentCreated(
        order_id=paid.order_id,
        shipment_id=str(shipment.id),
        customer_id=paid.customer_id,
        address=paid.address,
    )


@service.compensation("create_shipment")
def cancel(done: ShipmentCreated, ctx: Context) -> ShipmentCancelled:
    ctx.load(Shipment, done.order_id).cancel()
    return ShipmentCancelled(order_id=done.order_id, shipment_id=done.shipment_id)
