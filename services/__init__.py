"""The order-fulfilment example: five services that run a saga as a choreography."""

from __future__ import annotations

from choreo import System
from services import inventory, notification, orders, payment, shipping
from services.orders import ORDER_SAGA

SERVICES = (orders.service, inventory.service, payment.service, shipping.service, notification.service)

#: What `choreo run` is given to run each service as its own process.
TARGETS = {s.name: f"services.{s.name}:service" for s in SERVICES}

system = System(SERVICES, sagas=[ORDER_SAGA])
"""The example system: every service and the saga definition, checked at import."""
