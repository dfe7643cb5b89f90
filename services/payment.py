"""Payment: charges the customer's wallet and refunds it when the saga fails.

Canvas
- handles: step `process_payment` on `ItemsReserved`; its compensation.
- publishes: `PaymentCaptured`, `PaymentDeclined` (failure), `PaymentRefunded` (compensation).
- subscribes to: `ItemsReserved`, and every failure of the saga (by outcome).
- invariant: charged − refunded equals what confirmed orders paid.
- transient failure: the provider times out on the first attempt for customers named
  `flaky-*`; the retry policy (TimeoutError, ConnectionError; 4 attempts) retries it.
"""

from __future__ import annotations

from choreo import Aggregate, Context, RetryPolicy, Service, StepFailed, event
from services.contracts import ItemsReserved, PaymentCaptured, PaymentDeclined, PaymentRefunded

#: Opening balance (cents) of a customer's wallet; customers named `broke-*` have little.
RICH, BROKE = 100_000_000, 100

service = Service(
    "payment", retry=RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.2, retry_on=(TimeoutError, ConnectionError)),
    segments=16,  # `choreo run` it several times: the replicas split the sagas
)
_provider_calls: dict[str, int] = {}  # per process: orders whose first call timed out, until one succeeds


class ProviderTimeout(TimeoutError):
    """The (simulated) payment provider did not answer in time."""


def call_provider(order_id: str, customer_id: str) -> None:
    """Talk to the payment provider; it times out on the first call for `flaky-*` customers."""
    if customer_id.startswith("flaky-") and order_id not in _provider_calls:
        _provider_calls[order_id] = 1
        raise ProviderTimeout(f"payment provider timed out for order {order_id}")
    _provider_calls.pop(order_id, None)


class Wallet(Aggregate):
    """A customer's wallet, and what each order was charged."""

    @event("Opened")
    def __init__(self, customer_id: str, balance: int) -> None:
        self.customer_id = customer_id
        self.balance = balance
        self.charges: dict[str, int] = {}

    @event("Debited")
    def debit(self, order_id: str, amount: int) -> None:
        self.balance -= amount
        self.charges[order_id] = amount

    @event("Credited")
    def refund(self, order_id: str) -> None:
        self.balance += self.charges.pop(order_id)


def opening_balance(customer_id: str) -> int:
    """The balance a customer's wallet opens with."""
    return BROKE if customer_id.startswith("broke-") else RICH


def wallet(ctx: Context, customer_id: str) -> Wallet:
    """Load the customer's wallet, opening it on first use."""
    return ctx.find(Wallet, customer_id) or ctx.create(
        Wallet, customer_id, customer_id=customer_id, balance=opening_balance(customer_id)
    )


@service.step("process_payment", on=ItemsReserved, emits=[PaymentDeclined])
def charge(reserved: ItemsReserved, ctx: Context) -> PaymentCaptured:
    call_provider(reserved.order_id, reserved.customer_id)
    w = wallet(ctx, reserved.customer_id)
    if w.balance < reserved.amount:
        raise StepFailed(
            PaymentDeclined(
                order_id=reserved.order_id,
                customer_id=reserved.customer_id,
                amount=reserved.amount,
                reason="insufficient funds",
            )
        )
    w.debit(reserved.order_id, reserved.amount)
    return PaymentCaptured(
        order_id=reserved.order_id,
        customer_id=reserved.customer_id,
        amount=reserved.amount,
        address=reserved.address,
    )


@service.compensation("process_payment")
def refund(done: PaymentCaptured, ctx: Context) -> PaymentRefunded:
    ctx.load(Wallet, done.customer_id).refund(done.order_id)
    return PaymentRefunded(order_id=done.order_id, customer_id=done.customer_id, amount=done.amount)
