"""Replies to pipelined SMTP commands (RFC 2920) on an aiosmtplib connection.

aiosmtplib reads one reply per command it writes and drops replies that arrive together,
so it cannot pipeline. With a server that offers PIPELINING, a transaction writes
MAIL, RCPT and DATA at once and reads their three replies, then sends the message and
reads the last one: two round trips instead of four (five with the RSET that used to test
an idle connection), and two writes. For that exchange `PipelinedReplies` stands in for
aiosmtplib's protocol on the connection's transport; aiosmtplib's protocol gets it back
afterwards, and hears at once if the connection is lost meanwhile (so the session is
never reused by mistake).
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse

# aiosmtplib's limits (protocol.MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH).
_MAX_LINE = 8192
_MAX_BUFFER = 4 * _MAX_LINE
_INVALID = -1  # aiosmtplib's SMTPStatus.invalid_response


class PipelinedReplies(asyncio.Protocol):
    """The connection's protocol for the length of a `with` block."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        inner, transport = smtp.protocol, smtp.transport
        if inner is None or transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        if transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._inner: asyncio.BaseProtocol = inner
        # (uvloop's transports do not derive from asyncio.Transport, but are one.)
        self._transport = cast(asyncio.Transport, transport)
        self._buffer = bytearray()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: aiosmtplib.SMTPException | None = None
        self._lost = False

    def __enter__(self) -> PipelinedReplies:
        self._transport.set_protocol(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._lost:
            self._transport.set_protocol(self._inner)

    def write(self, data: bytes) -> None:
        if self._lost or self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def next(self, within: float | None) -> SMTPResponse:
        """The next reply, in the order of the commands."""
        if not self._replies and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, within)
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._error is not None
        raise self._error

    # --- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            while (reply := self._parse_one()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            return
        if len(self._buffer) > _MAX_BUFFER:
            self._fail(aiosmtplib.SMTPResponseException(_INVALID, "Response too long"))
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        # aiosmtplib's protocol marks the session closed and tells its SMTP object.
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # --- parsing ---------------------------------------------------------------------------

    def _parse_one(self) -> SMTPResponse | None:
        """One whole reply off the front of the buffer (multi-line: `250-...`), or None."""
        offset = 0
        lines: list[bytes] = []
        buffer = self._buffer
        while (end := buffer.find(b"\n", offset)) != -1:
            line = bytes(buffer[offset : end + 1])
            if len(line) > _MAX_LINE:
                raise aiosmtplib.SMTPResponseException(_INVALID, "Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                raise aiosmtplib.SMTPResponseException(
                    _INVALID, f"Malformed SMTP response line: {text}"
                ) from None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del buffer[:offset]
                message = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return SMTPResponse(code, message)
        return None

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
