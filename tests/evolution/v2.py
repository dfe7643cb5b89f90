"""The current code (v2) of the evolution tests' system, and the upcasters from v1.

Changes since v1: `evo.OrderOpened` v2 carries `amount` as a decimal and a `currency`
(v1 had `amount_cents`); the bank's `evo.PaymentTaken` is renamed `evo.PaymentCaptured`
with a decimal `amount`; `evo.CustomerNoted` is split into `evo.NoteAdded` and
`evo.TagAdded`. The upcasters are registered by `register_upcasters()` (the tests scope
them to one test: the registry is global).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

from choreo import Context, Event, SagaDefinition, Service, StepFailed, System
from choreo.upcasting import upcaster


class OrderOpened(Event):
    """v2: a decimal amount and its currency."""

    event_type: ClassVar[str] = "evo.OrderOpened"
    schema_version: ClassVar[int] = 2
    order_id: str
    amount: Decimal
    currency: str


class PaymentCaptured(Event):
    """The bank's completion event (v1 was `evo.PaymentTaken`, in cents)."""

    event_type: ClassVar[str] = "evo.PaymentCaptured"
    order_id: str
    amount: Decimal


class PaymentRefunded(Event):
    event_type: ClassVar[str] = "evo.PaymentRefunded"
    order_id: str
    amount: Decimal


class StockReserved(Event):
    event_type: ClassVar[str] = "evo.StockReserved"
    order_id: str


class StockShort(Event):
    event_type: ClassVar[str] = "evo.StockShort"
    order_id: str
    reason: str


class NoteAdded(Event):
    event_type: ClassVar[str] = "evo.NoteAdded"
    text: str


class TagAdded(Event):
    event_type: ClassVar[str] = "evo.TagAdded"
    tag: str


class Acked(Event):
    event_type: ClassVar[str] = "evo.Acked"
    what: str


ORDER = SagaDefinition("evo-order", start=OrderOpened, steps=("charge", "reserve"))

#: what the handlers received, to check that they got the current schema
received: list[Event] = []

shop = Service("shop", starts=[OrderOpened])
shop.track(ORDER)
bank = Service("bank")
stock = Service("stock")
crm = Service("crm")


@bank.step("charge", on=OrderOpened)
def charge(event: OrderOpened, ctx: Context) -> PaymentCaptured:
    received.append(event)
    return PaymentCaptured(order_id=event.order_id, amount=event.amount)


@bank.compensation("charge")
def refund(done: PaymentCaptured, ctx: Context) -> PaymentRefunded:
    received.append(done)
    return PaymentRefunded(order_id=done.order_id, amount=done.amount)


@stock.step("reserve", on=PaymentCaptured)
def reserve(event: PaymentCaptured, ctx: Context) -> StockReserved:
    received.append(event)
    if event.order_id.startswith("short"):
        raise StepFailed(StockShort(order_id=event.order_id, reason="none left"))
    return StockReserved(order_id=event.order_id)


@crm.on(NoteAdded)
def noted(event: NoteAdded, ctx: Context) -> Acked:
    received.append(event)
    return Acked(what=f"note {event.text}")


@crm.on(TagAdded)
def tagged(event: TagAdded, ctx: Context) -> Acked:
    received.append(event)
    if event.tag == "boom":
        raise ValueError("boom: no such tag")
    return Acked(what=f"tag {event.tag}")


system = System([shop, bank, stock, crm], sagas=[ORDER])


def register_upcasters() -> None:
    """Register the upcasters from v1 (as an application would at import)."""

    @upcaster("evo.OrderOpened", from_version=1)
    def cents_to_amount(payload: dict[str, Any]) -> dict[str, Any]:
        cents = payload.pop("amount_cents")
        return {**payload, "amount": str(Decimal(cents) / 100), "currency": "EUR"}

    @upcaster("evo.PaymentTaken", from_version=1, to="evo.PaymentCaptured")
    def renamed(payload: dict[str, Any]) -> dict[str, Any]:
        return {"order_id": payload["order_id"], "amount": str(Decimal(payload["cents"]) / 100)}

    @upcaster("evo.CustomerNoted", from_version=1, to=["evo.NoteAdded", "evo.TagAdded"])
    def split(payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"text": payload["note"]}, {"tag": payload["tag"]}]
