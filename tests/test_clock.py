"""Guarantee 7: every timestamp comes from one injectable clock."""

from __future__ import annotations

from datetime import datetime, timezone

from freezegun import freeze_time

import services
from choreo import ManualClock, use_clock
from choreo.aggregates import load_aggregate
from choreo.testing import TestSystem
from services import payment
from services.contracts import OrderPlaced

PLACED = OrderPlaced(order_id="o-1", customer_id="bob", sku="widget", quantity=1, amount=100, address="x")


def test_freezegun_drives_envelope_and_aggregate_timestamps() -> None:
    with freeze_time("2031-05-06 07:08:09"):
        harness = TestSystem(services.system)
        harness.start(PLACED)
        harness.run()
    expected = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    assert {e.occurred_at for e in harness.envelopes()} == {expected}
    wallet = load_aggregate(harness.store.service("payment"), payment.Wallet, "bob")
    assert wallet is not None and wallet.modified_on == expected


def test_a_manual_clock_is_used_when_installed() -> None:
    clock = ManualClock(datetime(2040, 1, 1, tzinfo=timezone.utc))
    previous = use_clock(clock)
    try:
        harness = TestSystem(services.system)
        harness.start(PLACED)
        clock.advance(60)
        harness.run()
    finally:
        use_clock(previous)
    times = [e.occurred_at for e in harness.envelopes()]
    assert times[0] == datetime(2040, 1, 1, tzinfo=timezone.utc)
    assert set(times[1:]) == {datetime(2040, 1, 1, 0, 1, tzinfo=timezone.utc)}
