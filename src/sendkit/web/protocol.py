"""uvicorn's HTTP/1.1 protocol (httptools), writing the documented `/v1` routes' responses
straight onto the connection.

Every request is parsed, limited, kept alive, pipelined, timed out and shut down by
uvicorn's own protocol. Only a direct route (`RequestContext.route`) runs differently:
its handler is called by `RequestContext.respond`, and the finished response goes out as
one write, instead of through uvicorn's ASGI cycle, the proxy-headers layer, the app's
door and Starlette's `Response.__call__` (two ASGI messages, each header checked and
copied again). That round trip was about a fifth of a send's CPU in the API process.
The request body still comes in through the cycle's `receive`, read by the handler after
its checks (100-continue, flow control and disconnects as uvicorn does them)."""

from __future__ import annotations

import contextvars
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.routing import BaseRoute
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from sendkit.web.middleware import Handler, RequestContext


class SendKitProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=SendKitProtocol)`: the app must be SendKit's (`create_app`);
    any other app is served exactly as uvicorn's own protocol would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._api = _sendkit_app(self.app)
        self._front: RequestContext | None = getattr(self._api, "front", None)
        self._fresh_context = bool(getattr(self.config, "reset_contextvars", False))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        front = self._front
        # `app` is another one when uvicorn answers 503 (its concurrency limit).
        direct = None
        if front is not None and app is self.app:
            direct = front.route(cycle.scope["method"], cycle.scope["path"])
        if front is None or direct is None:
            super()._start_asgi_task(cycle, app)
            return
        cycle.scope["app"] = self._api  # type: ignore[typeddict-unknown-key]
        context = contextvars.Context() if self._fresh_context else None
        task = self.loop.create_task(_run_direct(cycle, front, direct), context=context)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


def _sendkit_app(app: Any) -> Any:
    """The app inside uvicorn's wrappers (each keeps the next as `.app`)."""
    for _ in range(10):
        if hasattr(app, "front"):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


async def _run_direct(
    cycle: RequestResponseCycle, front: RequestContext, direct: tuple[BaseRoute, Handler]
) -> None:
    """`RequestResponseCycle.run_asgi` for a direct route, with the same answers to
    failure: a 500 if nothing was sent yet, else the connection closed."""
    try:
        # uvicorn's typed ASGI events against Starlette's plain mappings: the same thing.
        scope: Any = cycle.scope
        receive: Any = cycle.receive
        send: Any = cycle.send
        response = await front.respond(direct, scope, receive)
        body = _whole_body(response)
        if body is not None and _plain(scope["method"], response.status_code):
            await _write(cycle, response, body)
        else:
            await response(scope, receive, send)
    except BaseException as exc:
        cycle.logger.error("Exception in ASGI application\n", exc_info=exc)
        if not cycle.response_started:
            await cycle.send_500_response()
        else:
            cycle.transport.close()
    finally:
        cycle.on_response = lambda: None


def _plain(method: str, status: int) -> bool:
    """Whether the body goes out as it is: not for HEAD, a 1xx, 204 or 304 (uvicorn's
    `send` leaves it out there; none of the direct routes answers so today)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def _whole_body(response: Response) -> bytes | None:
    """The body of a response whose bytes are all there (not streamed) and that has
    nothing to run after it; None for any other."""
    body = getattr(response, "body", None)
    background: BackgroundTask | None = response.background
    return body if background is None and isinstance(body, bytes) else None


async def _write(cycle: RequestResponseCycle, response: Response, body: bytes) -> None:
    """`RequestResponseCycle.send` for a start and a whole body, in one write."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    headers = (*cycle.default_headers, *response.raw_headers)
    _check(headers)
    content = [STATUS_LINE[response.status_code]]
    closing = False
    for name, value in headers:
        if name == b"connection" and b"close" in _tokens(value):
            cycle.keep_alive, closing = False, True
        content.extend((name, b": ", value, b"\r\n"))
    if not cycle.keep_alive and not closing:
        content.append(b"connection: close\r\n")
    content.append(b"\r\n")
    content.append(body)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


# Every byte uvicorn's checks refuse in a header name, and in a value: each pattern is
# one character class, so the bytes it matches are the whole of it.
_BAD_IN_NAME = bytes(b for b in range(256) if HEADER_RE.match(bytes((b,))))
_BAD_IN_VALUE = bytes(b for b in range(256) if HEADER_VALUE_RE.match(bytes((b,))))


def _check(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    """uvicorn's checks (no CR or LF reaches the wire in a header) over every name, then
    every value, joined: a byte refused anywhere is one of a header's own. Deleting the
    refused bytes and comparing lengths is a third of the cost of the searches, which
    were two per header (~3 % of a send's CPU)."""
    names = b"".join([name for name, _ in headers])
    values = b"".join([value for _, value in headers])
    if len(names.translate(None, _BAD_IN_NAME)) != len(names) or len(
        values.translate(None, _BAD_IN_VALUE)
    ) != len(values):
        raise RuntimeError("Invalid HTTP header.")


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",")]
