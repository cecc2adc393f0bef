"""`web.protocol.SendKitProtocol`: the documented routes answered straight onto the
connection, through a real uvicorn server and raw sockets (keep-alive, pipelining,
100-continue, HTTP/1.0, streamed bodies, failures, header injection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import uvicorn

from sendkit import messages
from sendkit.config import Settings
from sendkit.services import Services
from sendkit.web import protocol
from sendkit.web.app import create_app
from tests.conftest import SEND_EXAMPLE, Tenant, assert_envelope, free_port


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@pytest.fixture
async def port(settings: Settings, services: Services) -> AsyncIterator[int]:
    chosen = free_port()
    config = uvicorn.Config(
        create_app(settings, services),
        host="127.0.0.1",
        port=chosen,
        http=protocol.SendKitProtocol,
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    yield chosen
    server.should_exit = True
    await task


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Status codes written by the direct path (a spy: the real `_write` still runs)."""
    seen: list[int] = []
    real = protocol._write

    async def spy(cycle: Any, response: Any, body: bytes) -> None:
        seen.append(response.status_code)
        await real(cycle, response, body)

    monkeypatch.setattr(protocol, "_write", spy)
    return seen


def request(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    token: str | None = None,
    version: str = "1.1",
    extra: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: sendkit.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body:
        lines += ["Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}"]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header twice: {name}"
        headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
    return Reply(int(status_line.split()[1]), headers, body)


SEND = orjson.dumps(SEND_EXAMPLE)


async def test_pipelined_requests_on_one_connection_are_answered_in_order(
    port: int, tenant: Tenant, direct_writes: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        request("POST", "/v1/send", SEND, token=tenant.token)
        + request("POST", "/v1/send", SEND, token="sk_wrong")
        + request("GET", "/healthz")  # not a direct route: uvicorn's ASGI cycle
        + request("POST", "/v1/send", SEND, token=tenant.token)
    )
    replies = [await read_reply(reader) for _ in range(4)]
    # ...and the connection is still open for more.
    writer.write(request("DELETE", "/v1/contact", b"{}", token=tenant.token))
    replies.append(await read_reply(reader))
    writer.close()

    sent, refused, _health, sent_again, delete = replies
    assert [r.status for r in replies] == [200, 401, 200, 200, 400]
    assert direct_writes == [200, 401, 200, 400]  # everything but /healthz went direct
    for reply in (sent, refused, sent_again, delete):
        payload = reply.json()
        assert reply.headers["x-request-id"] == payload["requestId"]
        assert reply.headers["content-type"] == "application/json"
        assert "date" in reply.headers and "connection" not in reply.headers
    assert_envelope(sent.json(), 0)
    assert sent.headers["x-message-id"] != sent_again.headers["x-message-id"]
    assert "x-ratelimit-limit" in sent.headers
    assert refused.json()["code"] != 0 and "x-message-id" not in refused.headers
    assert delete.json()["code"] != 0 and "x-ratelimit-limit" in delete.headers
    assert len({r.headers["x-request-id"] for r in replies}) == 5


async def test_expect_100_continue_is_answered_before_the_body(
    port: int, tenant: Tenant, direct_writes: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head, _, body = request(
        "POST", "/v1/send", SEND, token=tenant.token, extra=("Expect: 100-continue",)
    ).partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    reply = await read_reply(reader)
    writer.close()
    assert reply.status == 200 and direct_writes == [200]
    assert_envelope(reply.json(), 0)


async def test_http_1_0_and_connection_close_end_the_connection(
    port: int, tenant: Tenant, direct_writes: list[int]
) -> None:
    for version, extra in (("1.0", ()), ("1.1", ("Connection: close",))):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        send = request("POST", "/v1/send", SEND, token=tenant.token, version=version, extra=extra)
        writer.write(send)
        reply = await read_reply(reader)
        assert reply.status == 200 and reply.headers["connection"] == "close"
        # Closed by the server at once (not after the 5 s keep-alive timeout).
        assert await asyncio.wait_for(reader.read(), 1) == b""
        writer.close()
    assert direct_writes == [200, 200]


async def test_a_body_streamed_in_pieces_past_the_read_buffer(
    port: int, tenant: Tenant, direct_writes: list[int]
) -> None:
    """Over uvicorn's 64 KB buffer: reading pauses and resumes as the handler takes it."""
    payload = orjson.dumps({**SEND_EXAMPLE, "body": "x" * 300_000})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = request("POST", "/v1/send", payload, token=tenant.token)
    for start in range(0, len(raw), 50_000):
        writer.write(raw[start : start + 50_000])
        await writer.drain()
        await asyncio.sleep(0.01)
    reply = await read_reply(reader)
    writer.close()
    assert reply.status == 200 and direct_writes == [200]
    assert_envelope(reply.json(), 0)


async def test_a_failing_handler_answers_the_envelope_and_keeps_the_connection(
    port: int, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(messages, "submit", broken)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("POST", "/v1/send", SEND, token=tenant.token))
    failed = await read_reply(reader)
    writer.write(request("GET", "/healthz"))
    after = await read_reply(reader)
    writer.close()
    assert failed.status == 500 and after.status == 200
    payload = failed.json()
    assert_envelope(payload, payload["code"])
    assert payload["code"] != 0 and "database" not in payload["message"]
    assert failed.headers["x-request-id"] == payload["requestId"]


async def test_cr_or_lf_in_a_header_value_never_reaches_the_wire(
    port: int, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = messages.submit

    async def injected(*args: Any, **kwargs: Any) -> Any:
        accepted = await real(*args, **kwargs)
        return type(accepted)(**{**accepted.__dict__, "message_id": "x\r\nSet-Cookie: a=b"})

    monkeypatch.setattr(messages, "submit", injected)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("POST", "/v1/send", SEND, token=tenant.token))
    raw = await asyncio.wait_for(reader.read(), 10)  # a 500, then the connection closes
    writer.close()
    assert raw.startswith(b"HTTP/1.1 500 ")
    assert b"set-cookie" not in raw.lower()
