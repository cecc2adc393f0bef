"""Operations endpoints: `/metrics` (Prometheus), `/healthz` (the process answers) and
`/readyz` (the database answers), and how a request is counted."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.types import Scope

from sendkit import logs
from sendkit.errors import ServiceUnavailable
from sendkit.web import envelope
from sendkit.web.auth import services_of

log = logs.get("sendkit.web")

router = APIRouter(include_in_schema=False)

UNMATCHED = "<unmatched>"


@router.get("/healthz")
async def healthz(request: Request) -> envelope.JSONResponse:
    return envelope.ok(request.state.request_id, {"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> envelope.JSONResponse:
    try:
        async with services_of(request).db.read() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        log.warning("not_ready", error=str(exc))
        err = ServiceUnavailable("Not ready: the database does not answer")
        return envelope.error(request.state.request_id, err.status, err.code, err.message)
    return envelope.ok(request.state.request_id, {"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = services_of(request)
    body = await services.metrics.render(services.db)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def observe_request(scope: Scope, code: int, seconds: float) -> None:
    """Counts an HTTP request by route template (never the raw path: ids and tokens in
    paths would make a series per request), method and status code."""
    services = getattr(scope["app"], "services", None)
    if services is None:
        return
    # The router writes the matched route into the shared scope.
    route = getattr(scope.get("route"), "path", None) or UNMATCHED
    services.metrics.observe_http(route, scope["method"], code, seconds)
