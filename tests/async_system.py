"""A small async system for the kill -9 test of `tests/test_concurrency.py`, run as processes:

    python -m choreo run tests.async_system:desk --store sqlite:///x.db
    python -m choreo run tests.async_system:worker --store sqlite:///x.db

`desk` starts the saga and ends it. `worker` owns its three steps, every one `async def`
and waiting a few milliseconds, and handles up to 32 sagas at once. `prepare` adds the
saga to a `Bucket` that many sagas share (so concurrent sagas contend for it); `ship`
fails for keys ending in 7, which compensates `pack` and `prepare`. The aggregates refuse
a repeated effect (a key added twice, a parcel cancelled twice), so a duplicated effect
would show as a dead letter as well as in their versions.
"""

from __future__ import annotations

import asyncio
import random

from choreo import Aggregate, Context, SagaCompleted, SagaDefinition, SagaFailed, Service, StepFailed, System, event
from choreo.events import Event


class KOrdered(Event):
    key: str
    bucket: str


class KPrepared(Event):
    key: str
    bucket: str


class KUnprepared(Event):
    key: str
    bucket: str


class KPacked(Event):
    key: str
    bucket: str


class KUnpacked(Event):
    key: str


class KShipped(Event):
    key: str


class KRejected(Event):
    key: str
    reason: str


class KDone(Event):
    key: str


class KCancelled(Event):
    key: str
    compensated: list[str]


K_SAGA = SagaDefinition(name="k_order", start=KOrdered, steps=("prepare", "pack", "ship"), end=(KDone, KCancelled))
END_TYPES = frozenset({KDone.event_type, KCancelled.event_type})


def fails(key: str) -> bool:
    """Whether the saga of `key` fails at its last step (`ship`)."""
    return key.endswith("7")


class Bucket(Aggregate):
    """The keys prepared in one bucket; shared by many sagas."""

    @event("Opened")
    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[str] = []

    @event("Added")
    def add(self, key: str) -> None:
        if key in self.members:
            raise ValueError(f"{key} added to bucket {self.name} twice")
        self.members.append(key)

    @event("Removed")
    def remove(self, key: str) -> None:
        self.members.remove(key)


class Parcel(Aggregate):
    @event("Packed")
    def __init__(self, code: str) -> None:
        self.code = code
        self.cancelled = False

    @event("Cancelled")
    def cancel(self) -> None:
        if self.cancelled:
            raise ValueError(f"parcel {self.code} cancelled twice")
        self.cancelled = True


desk = Service("kdesk", starts=[KOrdered])
worker = Service("kworker", concurrency=32)


@desk.saga_completed(K_SAGA)
def done(completed: SagaCompleted, ctx: Context) -> KDone:
    return KDone(key=ctx.saga_id)


@desk.saga_failed(K_SAGA)
def cancelled(failed: SagaFailed, ctx: Context) -> KCancelled:
    return KCancelled(key=ctx.saga_id, compensated=sorted(failed.compensated))


async def pause() -> None:
    """Wait on a (simulated) remote call."""
    await asyncio.sleep(random.uniform(0.005, 0.02))


@worker.step("prepare", on=KOrdered)
async def prepare(order: KOrdered, ctx: Context) -> KPrepared:
    await pause()
    bucket = ctx.find(Bucket, order.bucket) or ctx.create(Bucket, order.bucket, name=order.bucket)
    await asyncio.sleep(0.001)  # holds the shared bucket across an await
    bucket.add(order.key)
    return KPrepared(key=order.key, bucket=order.bucket)


@worker.compensation("prepare")
async def unprepare(prepared: KPrepared, ctx: Context) -> KUnprepared:
    await pause()
    ctx.load(Bucket, prepared.bucket).remove(prepared.key)
    return KUnprepared(key=prepared.key, bucket=prepared.bucket)


@worker.step("pack", on=KPrepared)
async def pack(prepared: KPrepared, ctx: Context) -> KPacked:
    await pause()
    ctx.create(Parcel, prepared.key, code=prepared.key)
    return KPacked(key=prepared.key, bucket=prepared.bucket)


@worker.compensation("pack")
async def unpack(packed: KPacked, ctx: Context) -> KUnpacked:
    await pause()
    ctx.load(Parcel, packed.key).cancel()
    return KUnpacked(key=packed.key)


@worker.step("ship", on=KPacked)
async def ship(packed: KPacked, ctx: Context) -> KShipped:
    await pause()
    if fails(packed.key):
        raise StepFailed(KRejected(key=packed.key, reason="no carrier"))
    return KShipped(key=packed.key)


system = System([desk, worker], sagas=[K_SAGA])
TARGETS = {"kdesk": "tests.async_system:desk", "kworker": "tests.async_system:worker"}
