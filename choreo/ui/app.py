"""The console's ASGI application (Starlette): its routes, the token check, and errors as pages.

Reads go through a store opened read-only (`create=False`) and a `Console` that folds the
log's new events in memory, so no page ever writes the store. The actions (retry, skip,
force compensation) write exactly what `choreo dlq retry|skip|compensate` writes (the
same functions), and only with the console's token, after a confirmation page.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from choreo._dlq_cli import STATUSES, compensate_saga, retry_letters, skip_letter
from choreo.errors import ChoreoError, CommandRefused, StoreError
from choreo.operations import find_dead_letter
from choreo._saga_fold import STATES
from choreo.projection import SagaFilter
from choreo.store import EventStore, open_store
from choreo.system import System
from choreo.ui._graph import flow_of, layers
from choreo.ui._live import Console
from choreo.ui._pages import (
    PAGE_SIZE, confirm_page, e, layout, letter_page, letters_page, message_page, saga_page, sagas_page, system_page,
)
from choreo.ui._svg import graph_svg

#: Hosts a console bound to the loopback interface answers to (others: refused, against DNS rebinding).
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class Problem(Exception):
    """A request that cannot be served as asked: shown as a page with `status`."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def create_app(
    store_url: str | None,
    system: System,
    *,
    token: str | None = None,
    stuck_after: timedelta | None = timedelta(minutes=5),
    allowed_hosts: list[str] | None = None,
    store: EventStore | None = None,
) -> Starlette:
    """The console for the store at `store_url` (opened read-only) and `system`.

    Without `token` the console is read-only: every action is refused (403). With
    `allowed_hosts`, requests naming another host are refused (400). `store` is a store
    opened read-only already (tests); it is closed with the app.
    """
    console = Console(store or open_store(store_url, create=False), system, stuck_after=stuck_after)
    url = store_url or console.store.url
    token_bytes = token.encode() if token else None

    def page(title: str, body: str, *, active: str, live: bool = False, status: int = 200) -> HTMLResponse:
        ro = "" if token_bytes else " · read-only"
        return HTMLResponse(layout(title, body, active=active, live=live,
                                   status=f"log position {console.position()}{ro}"), status_code=status)

    def read(fn: Callable[..., Response]) -> Callable[[Request], Any]:
        """A page that reads: the console first catches up with the log (in a worker thread)."""
        async def endpoint(request: Request) -> Response:
            def run() -> Response:
                console.refresh()
                return fn(request)
            return await run_in_threadpool(run)
        return endpoint

    # -- sagas ------------------------------------------------------------------------------------
    @read
    def sagas(request: Request) -> Response:
        q = request.query_params
        params = {k: q[k] for k in ("q", "state", "type", "since", "until", "stuck_for") if q.get(k)}
        state = params.get("state")
        if state is not None and state not in STATES:
            raise Problem(400, "Bad filter", f"state: expected one of {', '.join(STATES)}, got {state!r}")
        where = SagaFilter(
            state=state, saga_type=params.get("type"),
            started_after=_time(params.get("since"), "since"), started_before=_time(params.get("until"), "until"),
            stuck_for=_duration(params.get("stuck_for"), "stuck_for"),
        )
        number = _whole(q.get("page", "1"), "page", least=1)
        with console.lock:
            found = console.projection.list(where)
            if text := params.get("q", "").strip():
                if console.overlay.get(text) is not None:
                    return RedirectResponse(f"/sagas/{text}", status_code=303)
                matches = console.search(text)
                found = [s for s in found if s["saga_id"] in matches]
            found.reverse()  # newest first
            shown = found[(number - 1) * PAGE_SIZE: number * PAGE_SIZE]
            keys = {s["saga_id"]: console.business_key(s["saga_id"]) for s in shown}
            counts = console.projection.counts()
            types = sorted({d.name for d in system.sagas} | {s["saga_type"] for s in found if s["saga_type"]})
        if number > 1 and not shown:
            raise Problem(400, "Bad filter", f"page: there are only {-(-len(found) // PAGE_SIZE)} page(s)")
        body = sagas_page(counts, shown, params, types, number, keys, len(found))
        return page("Sagas", body, active="sagas", live=True)

    @read
    def saga(request: Request) -> Response:
        saga_id = request.path_params["saga_id"]
        as_of_text = request.query_params.getlist("as_of")
        as_of = _position(as_of_text[-1], "as_of") if as_of_text and as_of_text[-1] else None
        with console.lock:
            doc = console.projection.get(saga_id, as_of=as_of)
            full = console.projection.get(saga_id) if doc is not None and as_of is not None else doc
            key = console.business_key(saga_id)
        if doc is None or full is None:
            raise Problem(404, "No such saga", f"no saga {saga_id!r} in {url}")
        last = full["timeline"][-1]["position"] if full["timeline"] else 0
        letters = console.dead_letters(None, saga_id=saga_id)
        body = saga_page(doc, as_of=as_of, last_position=last, key=key, letters=letters,
                         can_write=token_bytes is not None)
        return page(f"Saga {saga_id}", body, active="sagas", live=as_of is None)

    # -- dead letters -----------------------------------------------------------------------------
    @read
    def letters(request: Request) -> Response:
        status = request.query_params.get("status", "parked")
        if status not in STATUSES:
            raise Problem(400, "Bad filter", f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
        found = console.dead_letters(None if status == "all" else status)
        return page("Dead letters", letters_page(found, status, STATUSES), active="dlq", live=True)

    def letter_of(request: Request) -> Any:
        ref = f"{request.path_params['service']}:{request.path_params['id']}"
        try:
            with console.lock:
                return find_dead_letter(console.store, ref)
        except LookupError:
            raise Problem(404, "No such dead letter", f"no dead letter {ref!r} in {url}") from None

    @read
    def letter(request: Request) -> Response:
        d = letter_of(request)
        return page(f"Dead letter {d.service}:{d.id}", letter_page(d, token_bytes is not None), active="dlq", live=True)

    @read
    def confirm_letter(request: Request) -> Response:
        d, action = letter_of(request), request.path_params["action"]
        ref = f"{d.service}:{d.id}"
        if action == "retry":
            what = (f"Ask <b>{e(d.service)}</b> to run the parked <b>{e(d.type)}</b> of saga <code>{e(d.saga_id)}</code> "
                    "again, then the events held behind it: one <code>choreo.RetryRequested</code> event is "
                    "appended to the log.")
        else:
            what = (f"Ask <b>{e(d.service)}</b> to mark the parked <b>{e(d.type)}</b> of saga <code>{e(d.saga_id)}</code> "
                    "handled without running it: one <code>choreo.SkipRequested</code> event is appended to the log.")
        body = confirm_page(title=f"{action.capitalize()} {ref}", what=what, cli=f"choreo dlq {action} {ref}",
                            action=f"/dead-letters/{d.service}/{d.id}/{action}", needs_reason=action == "skip",
                            can_write=token_bytes is not None)
        return page(f"{action} {ref}", body, active="dlq")

    @read
    def confirm_compensate(request: Request) -> Response:
        saga_id = request.path_params["saga_id"]
        if console.overlay.get(saga_id) is None:
            raise Problem(404, "No such saga", f"no saga {saga_id!r} in {url}")
        what = (f"Fail saga <code>{e(saga_id)}</code> so that every participant compensates what it completed: one "
                "<code>choreo.CompensationRequested</code> event is appended to the log; the service that started "
                "the saga fails it, unless it ended first.")
        body = confirm_page(title=f"Force compensation of {saga_id}", what=what,
                            cli=f"choreo dlq compensate {saga_id}", action=f"/sagas/{saga_id}/compensate",
                            needs_reason=True, can_write=token_bytes is not None)
        return page("Force compensation", body, active="sagas")

    async def authorized(request: Request) -> dict[str, str]:
        """The action's form, once the token checks out (else 403, nothing written)."""
        # an HTML form's urlencoded body (parsed here: Starlette's form parser needs python-multipart)
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        if token_bytes is None:
            raise Problem(403, "Refused: read-only console",
                          "this console is read-only: start choreo ui with --token (or $CHOREO_UI_TOKEN) to allow "
                          "actions; nothing was written")
        given = form.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given:
            raise Problem(403, "Refused: token required", "this action writes to the store and needs the console's "
                                                          "token; nothing was written")
        if not hmac.compare_digest(given.encode(), token_bytes):
            raise Problem(403, "Refused: wrong token", "the token does not match the console's; nothing was written")
        if form.get("confirm") != "yes":
            raise Problem(400, "Not confirmed", "confirm: the action needs confirm=yes (the confirmation page sends "
                                                "it); nothing was written")
        return form

    async def act_letter(request: Request) -> Response:
        form = await authorized(request)
        action = request.path_params["action"]
        d = await run_in_threadpool(letter_of, request)
        reason = form.get("reason", "").strip()
        if action == "skip" and not reason:
            raise Problem(400, "Reason required", "reason: skipping a parked event needs a reason; nothing was written")
        ref = f"{d.service}:{d.id}"
        if action == "retry":
            lines = await run_in_threadpool(retry_letters, url, [d], reason)
            message = lines[0]
        else:
            message = await run_in_threadpool(skip_letter, url, ref, reason)
        return page("Requested", message_page("Requested", message, [
            (f"/sagas/{d.saga_id}", "the saga"), (f"/dead-letters/{d.service}/{d.id}", "the dead letter"),
            ("/dead-letters", "dead letters")]), active="dlq")

    async def act_compensate(request: Request) -> Response:
        form = await authorized(request)
        saga_id = request.path_params["saga_id"]
        reason = form.get("reason", "").strip()
        if not reason:
            raise Problem(400, "Reason required", "reason: forcing compensation needs a reason; nothing was written")
        message = await run_in_threadpool(compensate_saga, url, saga_id, reason, system.sagas)
        return page("Requested", message_page("Requested", message, [(f"/sagas/{saga_id}", "the saga")]),
                    active="sagas")

    # -- the system -------------------------------------------------------------------------------
    @read
    def system_view(request: Request) -> Response:
        with console.lock:
            flow = flow_of(system, dict(console.emitted))
        svg = graph_svg(layers(flow, [d.start.event_type for d in system.sagas]), flow.edges)
        defs = [(d.name, d.start.event_type, [(step, system.step_owners.get(step)) for step in d.steps])
                for d in system.sagas]
        return page("System", system_page(flow, svg, defs), active="system")

    async def problem(request: Request, exc: Exception) -> Response:
        if isinstance(exc, Problem):
            status, title, message = exc.status, exc.title, exc.message
        elif isinstance(exc, LookupError):
            status, title, message = 404, "Not found", str(exc)
        elif isinstance(exc, CommandRefused):
            status, title, message = 409, "Refused", str(exc)
        elif isinstance(exc, StoreError):
            status, title, message = 503, "Store unavailable", str(exc)
        else:
            status, title, message = 500, "Error", f"{type(exc).__name__}: {exc}"
        links = [("/sagas", "sagas"), ("/dead-letters", "dead letters")]
        return HTMLResponse(layout(title, message_page(title, message, links), active=""), status_code=status)

    async def home(request: Request) -> Response:
        return RedirectResponse("/sagas", status_code=303)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        console.close()

    static = StaticFiles(directory=str(files("choreo.ui") / "static"))
    routes = [
        Route("/", home),
        Route("/sagas", sagas),
        Route("/sagas/{saga_id}", saga),
        Route("/sagas/{saga_id}/compensate", confirm_compensate, methods=["GET"]),
        Route("/sagas/{saga_id}/compensate", act_compensate, methods=["POST"]),
        Route("/dead-letters", letters),
        Route("/dead-letters/{service}/{id:int}", letter),
        Route("/dead-letters/{service}/{id:int}/{action:str}", _only(("retry", "skip"), confirm_letter), methods=["GET"]),
        Route("/dead-letters/{service}/{id:int}/{action:str}", _only(("retry", "skip"), act_letter), methods=["POST"]),
        Route("/system", system_view),
        Mount("/static", app=static, name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={Problem: problem, ChoreoError: problem, 404: _not_found, Exception: problem})
    app.state.console = console
    return app


def _only(actions: tuple[str, ...], endpoint: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def guarded(request: Request) -> Response:
        if request.path_params["action"] not in actions:
            raise Problem(404, "Not found", f"no action {request.path_params['action']!r} (expected "
                                            f"{' or '.join(actions)})")
        response: Response = await endpoint(request)
        return response
    return guarded


async def _not_found(request: Request, exc: Exception) -> Response:
    title = "Not found"
    return HTMLResponse(layout(title, message_page(title, f"no page at {request.url.path}", [("/sagas", "sagas")]),
                               active=""), status_code=404)


def _time(text: str | None, field: str) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise Problem(400, "Bad filter", f"{field}: not an ISO time (e.g. 2026-01-31T12:00): {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _duration(text: str | None, field: str) -> timedelta | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise Problem(400, "Bad filter", f"{field}: expected a number of seconds, 0 or more, got {text!r}")
    return timedelta(seconds=value)


def _whole(text: str, field: str, *, least: int) -> int:
    if not text.isdigit() or int(text) < least:
        raise Problem(400, "Bad filter", f"{field}: expected a whole number of at least {least}, got {text!r}")
    return int(text)


def _position(text: str, field: str) -> int:
    if not text.isdigit():
        raise Problem(400, "Bad value", f"{field}: expected a log position (a whole number), got {text!r}")
    return int(text)
