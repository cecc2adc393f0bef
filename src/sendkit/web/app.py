"""create_app(settings): routers, the one error handler, and the lifespan."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from sendkit import __version__, logs
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.errors import BadRequest, MethodNotAllowed, RouteNotFound, SendKitError
from sendkit.services import Services
from sendkit.web import api, dashboard, deliverability, envelope, ops, unsubscribe
from sendkit.web.middleware import DirectRoutes, Handler, RequestContext

log = logs.get("sendkit.web")


class _SendKitAPI(FastAPI):
    """FastAPI, with the documented `/v1` routes served at the door: by `front` (the same
    RequestContext as every other route gets, with the direct routes), before FastAPI's
    and Starlette's layers (native telemetry, error, body-limit and exception
    middlewares), which only repeat what RequestContext and the handlers do."""

    front: RequestContext | None = None
    # Not in `app.state`: Starlette's State answers each read through a failed attribute
    # lookup (an exception raised and caught) before its `__getattr__`, twice a request.
    services: Services | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        if front is not None and scope["type"] == "http" and front.serves(scope):
            scope["app"] = self
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """With `services`, the caller owns them (tests); without, the lifespan builds them."""

    @asynccontextmanager
    async def lifespan(app: _SendKitAPI) -> AsyncIterator[None]:
        own = services is None
        # A loop that only serves requests commits on itself; one that also delivers
        # leaves commits to the writer thread (its SMTP sessions must not wait).
        running = services or services_mod.build(
            settings,
            commit_in_loop=not settings.workers,
            api_first=None if settings.workers else "announce",
        )
        app.services = running
        workers = None
        if settings.workers and own:
            # Imported here: the API alone (tests, `--no-workers`) never loads SMTP code.
            from sendkit.delivery.runner import start_workers

            workers = start_workers(running)
        if own:
            # Everything built so far lives as long as the process: out of the collector's
            # way, so a full collection (100-200 ms at 1M-contact pages) stays short.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if workers is not None:
                await workers.stop()
            if own:
                await running.close()

    app = _SendKitAPI(
        title="SendKit",
        version=__version__,
        lifespan=lifespan,
        default_response_class=envelope.JSONResponse,
    )
    if services is not None:
        app.services = services
    app.include_router(api.router)
    app.include_router(deliverability.router)
    app.include_router(unsubscribe.router)
    app.include_router(ops.router)
    app.add_exception_handler(SendKitError, _sendkit_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    dashboard.install(app)  # pages under /, after the API's handlers (it wraps the 404 one)
    app.add_middleware(RequestContext)
    app.front = RequestContext(app, direct=_direct_routes())
    return app


def _direct_routes() -> DirectRoutes:
    """The documented `/v1` routes, for RequestContext to call without FastAPI's routing."""
    found: dict[tuple[str, str], tuple[BaseRoute, Handler]] = {}
    for route in api.router.routes:
        if isinstance(route, APIRoute):
            for method in route.methods or ():
                found[(method, route.path)] = (route, route.endpoint)
    return found


def _request_id(request: Request) -> str:
    return str(request.state.request_id)


async def _sendkit_error(request: Request, exc: SendKitError) -> Response:
    if exc.status >= 500:
        log.warning("service_error", code=exc.code, message=exc.message)
    return envelope.error(_request_id(request), exc.status, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    err: SendKitError
    if exc.status_code == 404:
        err = RouteNotFound()
    elif exc.status_code == 405:
        err = MethodNotAllowed()
    else:
        err = BadRequest(f"Bad request parameters: {exc.detail}")
        err.status = exc.status_code
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    return envelope.error(_request_id(request), err.status, err.code, err.message, headers)


def _allowed_methods(request: Request) -> set[str]:
    """Starlette names only the first matching route's methods; RFC 9110 wants them all.
    Routers may be nested, so ask the top-level routes once per method."""
    allowed: set[str] = set()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(r.matches(scope)[0] == Match.FULL for r in request.app.router.routes):
            allowed.add(method)
    return allowed


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    err = BadRequest(f"Bad request parameters: {exc.errors()[0].get('msg', 'invalid')}")
    return envelope.error(_request_id(request), err.status, err.code, err.message)
