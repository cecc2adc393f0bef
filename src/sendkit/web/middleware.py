"""The outermost layer: request ids, extra headers, access logs, request metrics, and the
last-resort 500. One ASGI layer for all of it: each layer costs every request a wrapper."""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sendkit import logs
from sendkit.errors import SendKitError
from sendkit.web import envelope
from sendkit.web.ops import observe_request

log = logs.get("sendkit.http")


class RequestContext:
    """Gives every request a uuid4 `requestId`, echoed in `X-Request-Id` and every log line.

    Handlers may put headers into `scope["state"]["extra_headers"]` (rate-limit headers);
    they are added here so error responses carry them too. An exception that escapes the
    app is logged with its traceback and answered with a generic envelope. Every request,
    that 500 included, is counted by route template (`ops.observe_request`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["extra_headers"] = {}
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500, "sent": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                for name, value in state["extra_headers"].items():
                    headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        bound = logs.bind_request(request_id)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled_error", method=scope["method"], path=scope["path"])
            if not status["sent"]:
                err = SendKitError()
                response = envelope.error(request_id, err.status, err.code, err.message)
                await response(scope, receive, send_with_headers)
        finally:
            # Also for a request cancelled midway (the client went away): counted, logged.
            seconds = time.perf_counter() - started
            observe_request(scope, status["code"], seconds)
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status["code"],
                duration_ms=round(seconds * 1000, 2),
            )
            logs.unbind_request(bound)
