"""An oversized request body is refused while it streams in, through real uvicorn."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.live import live_server

LIMIT = 2000  # --max-size; the server adds its JSON allowance (64 KiB) on top


def _request_head(token: str, extra: str) -> bytes:
    return (
        "POST /v1/send HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return int(data.split(b" ", 2)[1]), body


@pytest.mark.slow
def test_oversized_body_refused_before_it_is_read_whole(tmp_path: Path, database_url: str) -> None:
    with live_server(tmp_path, database_url) as server:
        demo = server.cli("init", "--demo")
        server.cli("account", "set-plan", demo["accountId"], "--max-size", str(LIMIT))
        port = int(server.base_url.rsplit(":", 1)[1])

        # Declared too large: answered from the headers alone, no body sent at all.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(_request_head(demo["apiKey"], "Content-Length: 500000000\r\n"))
            status, raw = _read_status(sock)
        assert status == 413 and b"100023" in raw

        # Chunked, no length: refused once the running count passes the limit, while the
        # client still holds (and never sends) the rest of a 500 MB body.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(_request_head(demo["apiKey"], "Transfer-Encoding: chunked\r\n"))
            chunk = b"x" * 32768
            for _ in range(4):  # 128 KiB, over 2000 + 64 KiB
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            status, raw = _read_status(sock)
        assert status == 413 and b"100023" in raw
