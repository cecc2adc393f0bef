"""The outermost layer: request ids, extra headers, access logs, request metrics, and the
last-resort 500. One ASGI layer for all of it: each layer costs every request a wrapper.

For the documented `/v1` routes ("direct routes") it is the app's door (`app.front`):
it runs before FastAPI's own layers and calls the handlers itself. Their path is fixed
and they take the bare `Request`, so FastAPI's telemetry, error and exception
middlewares, exit stack, router matching and endpoint wrapper only repeat what this
layer, the handlers and the app's error handlers already do. The routes stay registered
with FastAPI as well (OpenAPI, 405s, other methods)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import Token
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sendkit import ids, logs
from sendkit.errors import SendKitError
from sendkit.web import envelope
from sendkit.web.ops import observe_request

log = logs.get("sendkit.http")

Handler = Callable[[Request], Awaitable[Response]]
# (method, path) -> the route (for metrics) and its handler
DirectRoutes = Mapping[tuple[str, str], tuple[BaseRoute, Handler]]


class RequestContext:
    """Gives every request a `requestId` (a UUIDv7: `ids.request_id`), echoed in
    `X-Request-Id` and every log line.

    Handlers may put headers into `scope["state"]["extra_headers"]` (rate-limit headers);
    they are added here so error responses carry them too. An exception that escapes the
    app is logged with its traceback and answered with a generic envelope. Every request,
    that 500 included, is counted by route template (`ops.observe_request`).
    """

    def __init__(self, app: ASGIApp, direct: DirectRoutes | None = None) -> None:
        self.app = app
        self._direct = dict(direct or {})

    def serves(self, scope: Scope) -> bool:
        """Whether this is one of the direct routes."""
        return self.route(scope["method"], scope["path"]) is not None

    def route(self, method: str, path: str) -> tuple[BaseRoute, Handler] | None:
        """The direct route for this method and path, if it is one."""
        return self._direct.get((method, path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        direct = self.route(scope["method"], scope["path"])
        if direct is not None:
            response = await self.respond(direct, scope, receive)
            await response(scope, receive, send)
            return
        request_id, extra, started, bound = _begin(scope)
        status: dict[str, Any] = {"code": 500, "sent": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                headers = list(message.get("headers", []))
                headers.extend(_added_headers(request_id, extra))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled_error", method=scope["method"], path=scope["path"])
            if not status["sent"]:
                response = _last_resort(request_id)
                await response(scope, receive, send_with_headers)
        finally:
            # Also for a request cancelled midway (the client went away): counted, logged.
            _finish(scope, status["code"], started, bound)

    async def respond(
        self, direct: tuple[BaseRoute, Handler], scope: Scope, receive: Receive
    ) -> Response:
        """A direct route's whole response, its request id and extra headers included,
        counted and logged: the caller only writes it out (as ASGI messages here, or
        straight onto the connection: `web.protocol`). The body is read through
        `receive` by the handler itself, after its checks, as on any other route."""
        request_id, extra, started, bound = _begin(scope)
        code = 500
        try:
            try:
                response = await self._call_direct(direct, scope, receive)
            except Exception:
                log.exception("unhandled_error", method=scope["method"], path=scope["path"])
                response = _last_resort(request_id)
            response.raw_headers.extend(_added_headers(request_id, extra))
            code = response.status_code
            return response
        finally:
            _finish(scope, code, started, bound)

    async def _call_direct(
        self, direct: tuple[BaseRoute, Handler], scope: Scope, receive: Receive
    ) -> Response:
        route, handler = direct
        scope["route"] = route  # what the router would have set (metrics by template)
        request = Request(scope, receive)
        try:
            return await handler(request)
        except Exception as exc:
            # The app's own handlers, as its exception middleware would pick them (by the
            # exception's classes, most specific first); none: the last-resort 500.
            on_error = _handler_for(scope["app"].exception_handlers, exc)
            if on_error is None:
                raise
            response: Response = await on_error(request, exc)
            return response


def _begin(scope: Scope) -> tuple[str, dict[str, str], float, Token[str | None]]:
    """A request's id (in its state and its log lines), the dict its handlers put extra
    headers in, its start time, and the log binding `_finish` undoes."""
    request_id = ids.request_id()
    extra: dict[str, str] = {}
    state = scope.setdefault("state", {})
    state["request_id"] = request_id
    state["extra_headers"] = extra
    return request_id, extra, time.perf_counter(), logs.bind_request(request_id)


def _added_headers(request_id: str, extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    added = [(b"x-request-id", request_id.encode())]
    added.extend((name.lower().encode(), value.encode()) for name, value in extra.items())
    return added


def _last_resort(request_id: str) -> Response:
    err = SendKitError()
    return envelope.error(request_id, err.status, err.code, err.message)


def _finish(scope: Scope, code: int, started: float, bound: Token[str | None]) -> None:
    seconds = time.perf_counter() - started
    observe_request(scope, code, seconds)
    logs.info(
        log,
        "request",
        method=scope["method"],
        path=scope["path"],
        status=code,
        duration_ms=round(seconds * 1000, 2),
    )
    logs.unbind_request(bound)


def _handler_for(handlers: Mapping[Any, Any], exc: Exception) -> Any:
    for kind in type(exc).__mro__:
        if kind in handlers:
            return handlers[kind]
    return None
