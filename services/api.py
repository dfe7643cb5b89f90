"""An HTTP front door for the order example: place an order, then follow its saga.

    uvicorn services.api:app          # from the repository's root

- `POST /orders` starts an order-fulfilment saga and answers 202 at once, with the
  saga id and its URL in `Location`; the saga runs on without the request.
- `GET /orders/{saga_id}` answers from the saga projection: the saga's state, each
  step's status, and the cause of a failure.

The app's lifespan opens the store and runs the example's services with
`choreo.AsyncRunner`, as tasks in the app's own event loop. Nothing blocks the loop:
the store is called from worker threads, and so are the example's plain handlers.

Settings, from the environment, read when the app starts:

- `CHOREO_STORE`: the store's URL (default `sqlite:///choreo.db`), as for every
  `choreo` command.
- `CHOREO_API_SERVICES`: which of the example's services run inside the app: `all`
  (the default), `none` (they run elsewhere, say as `choreo run` processes on the same
  store), or names separated by commas.

FastAPI, not bare Starlette: the request body is a pydantic model, as choreo's events
are, so a bad body is refused with a 422 that names the field, and the API documents
itself at `/docs`, with no code of ours.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from choreo import AsyncRunner, SagaProjection, StoreError, open_store
from services import system
from services.contracts import OrderPlaced
from services.orders import ORDER_SAGA


class PlaceOrder(BaseModel):
    """The body of `POST /orders`: an `OrderPlaced`'s fields, and optionally the saga id.

    It is the API's contract, not the event's: it refuses what no order can be (a
    quantity of 0, a negative amount) before anything is written.
    """

    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    sku: str = Field(min_length=1)
    quantity: int = Field(ge=1)
    amount: int = Field(ge=0, description="in cents")
    address: str = Field(min_length=1)
    saga_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._~-]{1,128}$",
        description="the saga's id (default: a new UUID); a saga id that was started already starts nothing",
    )

    def event(self) -> OrderPlaced:
        """The saga's initiating event."""
        return OrderPlaced(**self.model_dump(exclude={"saga_id"}))


class OrderAccepted(BaseModel):
    """The answer of `POST /orders`: the id of the order's saga (its URL is in `Location`)."""

    saga_id: str


class OrderStatus(BaseModel):
    """The answer of `GET /orders/{saga_id}`: where the order's saga is, from the saga projection."""

    saga_id: str
    state: str = Field(description="started, running, compensating, completed, failed or stuck")
    cause: str | None = Field(description="why the saga failed: the step, the failure and its reason")
    steps: dict[str, dict[str, Any]] = Field(description="each step's status and service, with times")
    started_at: str | None
    ended_at: str | None


class Orders:
    """What the app's requests share while it runs: the services' runner and the saga projection."""

    def __init__(self, runner: AsyncRunner, projection: SagaProjection) -> None:
        self.runner = runner
        self.projection = projection
        self._reading = asyncio.Lock()  # one projection update at a time (it keeps its place in the log)

    async def place(self, order: PlaceOrder) -> str:
        """Start the order's saga: append its `OrderPlaced` from a worker thread; return the saga id."""
        return await self.runner.start(order.event(), saga_id=order.saga_id)

    async def saga(self, saga_id: str) -> dict[str, Any] | None:
        """The saga's projection document, brought up to date first, read in a worker thread."""
        async with self._reading:
            return await asyncio.to_thread(self._read, saga_id)

    def _read(self, saga_id: str) -> dict[str, Any] | None:
        self.projection.update()  # as `choreo sagas show` does: a saga started a moment ago is found
        saga = self.projection.get(saga_id)
        return saga if saga is not None and saga["saga_type"] == ORDER_SAGA.name else None


def services_setting(value: str | None) -> list[str] | None:
    """The services to run, from `$CHOREO_API_SERVICES`: None for all of them, [] for none."""
    value = (value or "all").strip()
    if value == "all":
        return None
    if value == "none":
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Orders]]:
    """Open the store and run the services in the app's event loop until the app stops."""
    services = services_setting(os.environ.get("CHOREO_API_SERVICES"))
    store = await asyncio.to_thread(open_store)  # $CHOREO_STORE, else sqlite:///choreo.db
    try:
        # threads=1: the example's handlers are plain functions that read their aggregates
        # from the store, so each service runs them in a worker thread, not in this loop
        async with AsyncRunner(system, store, services=services, threads=1) as runner:
            projection = SagaProjection(store, sagas=system.sagas)
            try:
                yield {"orders": Orders(runner, projection)}  # each request's `request.state`
            finally:
                await asyncio.to_thread(projection.close)
    finally:
        await asyncio.to_thread(store.close)


app = FastAPI(title="choreo orders", lifespan=lifespan)
"""The app that `uvicorn services.api:app` serves."""


def running_orders(request: Request) -> Orders:
    """The `Orders` of the app's current run (from its lifespan's state)."""
    return request.state.orders  # type: ignore[no-any-return]


OrdersDep = Annotated[Orders, Depends(running_orders)]


@app.post("/orders", status_code=status.HTTP_202_ACCEPTED)
async def place_order(order: PlaceOrder, orders: OrdersDep, request: Request, response: Response) -> OrderAccepted:
    """Start the order's saga; answer at once, with the saga's URL in `Location`."""
    saga_id = await orders.place(order)
    response.headers["Location"] = str(request.url_for("order_status", saga_id=saga_id))
    return OrderAccepted(saga_id=saga_id)


@app.get("/orders/{saga_id}")
async def order_status(saga_id: str, orders: OrdersDep) -> OrderStatus:
    """Where the order's saga is: its state, steps and cause (404 for a saga never started)."""
    saga = await orders.saga(saga_id)
    if saga is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order saga {saga_id!r}")
    return OrderStatus.model_validate(saga)


@app.exception_handler(StoreError)
async def store_unavailable(request: Request, error: StoreError) -> JSONResponse:
    """A store that is locked or unreachable: 503, try again later."""
    return JSONResponse({"detail": f"the store is unavailable: {error}"},
                        status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "1"})
