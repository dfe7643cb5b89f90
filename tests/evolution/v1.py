"""The old code (schema version 1): the bank's charge step, run over a log as an old process would.

Run as `python -m tests.evolution.v1 STORE_URL`; never imported by the tests themselves
(its version-1 classes would share the registry with the current ones).
"""

from __future__ import annotations

import sys
import time
from typing import ClassVar

from choreo import Context, Event, Processor, Service, open_store


class OrderOpened(Event):
    """v1: the amount in cents."""

    event_type: ClassVar[str] = "evo.OrderOpened"
    order_id: str
    amount_cents: int


class PaymentTaken(Event):
    """v1: the bank's completion event (renamed `evo.PaymentCaptured` in v2)."""

    event_type: ClassVar[str] = "evo.PaymentTaken"
    order_id: str
    cents: int


bank = Service("bank")


@bank.step("charge", on=OrderOpened)
def charge(event: OrderOpened, ctx: Context) -> PaymentTaken:
    return PaymentTaken(order_id=event.order_id, cents=event.amount_cents)


if __name__ == "__main__":
    store = open_store(sys.argv[1])
    proc = Processor(bank, store)
    expected, read, deadline = int(sys.argv[2]), 0, time.monotonic() + 60
    while read < expected and time.monotonic() < deadline:  # on Kafka, partitions come after a few polls
        read += proc.poll(0.5)
    proc.poll(0)  # publish the outbox (Kafka)
    proc.close()
    store.close()
    print(read)
