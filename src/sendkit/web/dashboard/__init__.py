"""The dashboard: server-rendered pages (Jinja2 + htmx) under `/`, beside the API's `/v1`.

`install(app)` adds the pages, the static files and, for browsers, an HTML "not found"
page; API clients keep getting the JSON envelope for unknown paths.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from sendkit.web.dashboard import (
    auth_views,
    contact_views,
    core,
    deliverability_views,
    domain_views,
    home_views,
    message_views,
    operator_views,
)


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    yield
    # Stop this process's CSV imports before the services close (their jobs say so).
    services = getattr(app.state, "services", None)
    running = services.extras.get("imports") if services is not None else None
    if running is not None:
        await running.close()


def router() -> APIRouter:
    combined = APIRouter(lifespan=_lifespan, include_in_schema=False)
    for module in (
        auth_views,
        home_views,
        contact_views,
        message_views,
        domain_views,
        deliverability_views,
        operator_views,
    ):
        combined.include_router(module.router)
    return combined


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/v1", "/docs", "/openapi", "/static")):
        return False
    return "text/html" in request.headers.get("accept", "")


def install(app: FastAPI) -> None:
    """Call after the API's exception handlers are registered."""
    app.include_router(router())
    app.mount("/static", StaticFiles(directory=core.STATIC_DIR), name="static")
    api_handler = app.exception_handlers[StarletteHTTPException]

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404 and request.method == "GET" and _wants_html(request):
            return await _html_not_found(request)
        response: Response = await api_handler(request, exc)  # type: ignore[misc]
        return response

    app.add_exception_handler(StarletteHTTPException, not_found)


async def _html_not_found(request: Request) -> Response:
    page = await core.open_page(request)
    response = core.error_page(page, core.PageNotFound())
    core.security_headers(response)
    return response
