"""The intake benchmark's peer: FastAPI answering `POST /v1/send` with SendKit's success
envelope and doing nothing else (no auth, no validation, no database).

    .venv/bin/python -m uvicorn bare_app:app --app-dir bench --workers 2 --no-access-log
"""

from __future__ import annotations

import time
import uuid

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()


@app.post("/v1/send")
async def send(request: Request) -> Response:
    await request.body()  # the same bytes come in as for SendKit
    request_id = str(uuid.uuid4())
    envelope = {
        "requestId": request_id,
        "code": 0,
        "success": True,
        "message": "Successfully",
        "ts": time.time_ns() // 1_000_000,
        "data": None,
    }
    return Response(
        orjson.dumps(envelope),
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )
