"""The documented response: {requestId, code, success, message, ts, data}."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.responses import Response

SUCCESS_MESSAGE = "Successfully"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def body(request_id: str, code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {
        "requestId": request_id,
        "code": code,
        "success": code == 0,
        "message": message,
        "ts": time.time_ns() // 1_000_000,
        "data": data,
    }


def ok(request_id: str, data: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(request_id, 0, SUCCESS_MESSAGE, data), headers=headers)


def error(
    request_id: str, status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body(request_id, code, message), status_code=status, headers=headers)
