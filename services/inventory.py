"""Inventory: reserves stock for an order and releases it when the saga fails.

Canvas
- handles: step `reserve_inventory` on `OrderPlaced`; its compensation.
- publishes: `ItemsReserved`, `OutOfStock` (failure), `ItemsReleased` (compensation).
- subscribes to: `OrderPlaced`, and every failure of the saga (by outcome).
- invariant: stock is never negative.
"""

from __future__ import annotations

from choreo import Aggregate, Context, Service, StepFailed, event
from services.contracts import ItemsReleased, ItemsReserved, OrderPlaced, OutOfStock

#: Stock on hand when an item is first used. `rare-gem` is never in stock.
CATALOG = {"widget": 1_000_000, "gadget": 1_000_000, "rare-gem": 0}


class StockItem(Aggregate):
    """Stock of one SKU: what is on hand and what each order has reserved."""

    @event("Stocked")
    def __init__(self, sku: str, on_hand: int) -> None:
        self.sku = sku
        self.on_hand = on_hand
        self.reserved: dict[str, int] = {}

    @event("Reserved")
    def reserve(self, order_id: str, quantity: int) -> None:
        if quantity > self.on_hand:
            raise ValueError(f"stock of {self.sku} would go negative")
        self.on_hand -= quantity
        self.reserved[order_id] = quantity

    @event("Released")
    def release(self, order_id: str) -> None:
        self.on_hand += self.reserved.pop(order_id)


#: One StockItem per SKU gains an event per order: a restart loads it from its latest snapshot
#: (taken every 1000 events) instead of replaying every order (docs/evolution.md).
#: `choreo run` it several times: the replicas split the sagas (segments).
service = Service("inventory", segments=16, snapshot_every={StockItem: 1000})


def stock_item(ctx: Context, sku: str) -> StockItem:
    """Load the stock of `sku`, stocking it from the catalog on first use."""
    return ctx.find(StockItem, sku) or ctx.create(StockItem, sku, sku=sku, on_hand=CATALOG.get(sku, 0))


@service.step("reserve_inventory", on=OrderPlaced, emits=[OutOfStock])
def reserve(order: OrderPlaced, ctx: Context) -> ItemsReserved:
    item = stock_item(ctx, order.sku)
    if order.quantity > item.on_hand:
        raise StepFailed(
            OutOfStock(order_id=order.order_id, sku=order.sku, requested=order.quantity, available=item.on_hand)
        )
    item.reserve(order.order_id, order.quantity)
    return ItemsReserved(**order.model_dump())


@service.compensation("reserve_inventory")
def release(done: ItemsReserved, ctx: Context) -> ItemsReleased:
    ctx.load(StockItem, done.sku).release(done.order_id)
    return ItemsReleased(order_id=done.order_id, sku=done.sku, quantity=done.quantity)
