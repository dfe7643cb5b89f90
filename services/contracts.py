"""The integration events of the order-fulfilment saga, shared by every service.

Each step's completion event carries what the next step needs (event-carried
state), so no service reads another service's state. Money is in cents.
"""

from __future__ import annotations

from choreo import Event


class OrderPlaced(Event):
    """A customer placed an order; starts the order-fulfilment saga."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int
    address: str


class ItemsReserved(Event):
    """Inventory reserved the order's items (step reserve_inventory completed)."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int
    address: str


class OutOfStock(Event):
    """Inventory could not reserve the items (step reserve_inventory failed)."""

    order_id: str
    sku: str
    requested: int
    available: int


class ItemsReleased(Event):
    """Inventory released a reservation (reserve_inventory compensated)."""

    order_id: str
    sku: str
    quantity: int


class PaymentCaptured(Event):
    """Payment charged the customer (step process_payment completed)."""

    order_id: str
    customer_id: str
    amount: int
    address: str


class PaymentDeclined(Event):
    """Payment could not charge the customer (step process_payment failed)."""

    order_id: str
    customer_id: str
    amount: int
    reason: str


class PaymentRefunded(Event):
    """Payment refunded a charge (process_payment compensated)."""

    order_id: str
    customer_id: str
    amount: int


class ShipmentCreated(Event):
    """Shipping booked a shipment (step create_shipment completed)."""

    order_id: str
    shipment_id: str
    customer_id: str
    address: str


class ShipmentRejected(Event):
    """Shipping cannot deliver to the address (step create_shipment failed)."""

    order_id: str
    address: str
    reason: str


class ShipmentCancelled(Event):
    """Shipping cancelled a shipment (create_shipment compensated)."""

    order_id: str
    shipment_id: str


class ConfirmationSent(Event):
    """Notification told the customer the order is on its way (send_confirmation completed)."""

    order_id: str
    customer_id: str


class CancellationNoticeSent(Event):
    """Notification told the customer the order was cancelled (send_confirmation compensated)."""

    order_id: str
    customer_id: str


class OrderConfirmed(Event):
    """The order is fulfilled; ends the saga."""

    order_id: str
    amount: int


class OrderCancelled(Event):
    """The order failed and every completed step was compensated; ends the saga."""

    order_id: str
    reason: str
    compensated: list[str]


class OrderTimedOut(Event):
    """The order was not fulfilled in time (the orders service's deadline); fails the saga."""

    order_id: str
    reason: str
