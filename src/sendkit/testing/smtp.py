"""In-process SMTP sink for tests: a real aiosmtpd server that records and misbehaves on demand.

The server runs in aiosmtpd's threaded ``Controller`` on 127.0.0.1 with an ephemeral port, so
the code under test talks real SMTP over a real socket. Everything it receives is recorded
(:class:`ReceivedMessage`), connections are counted, and a :class:`Fault` set on the sink makes
it reply with a chosen code, hang up, or stall at one stage of the session::

    async with smtp_sink() as sink:
        sink.fault = Fault.reply(Stage.RCPT, 550, "5.1.1 no such user")
        ...
        assert sink.messages == []
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from sendkit.testing.lifecycle import StartStop

if TYPE_CHECKING:
    import trustme

__all__ = [
    "Fault",
    "ReceivedMessage",
    "SinkTls",
    "SmtpSink",
    "Stage",
    "smtp_sink",
]

SinkTls = Literal["none", "starttls", "implicit"]

_SHUTDOWN_GRACE = 5.0


class Stage(StrEnum):
    """Where in the SMTP session a :class:`Fault` strikes."""

    CONNECT = "connect"  # instead of / before the 220 greeting
    EHLO = "ehlo"  # EHLO and HELO
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command itself, before 354
    BODY = "body"  # after 354, with only part of the message read (disconnect only)
    DOT = "dot"  # after the final ".", before the reply


@dataclass(frozen=True)
class Fault:
    """Misbehaviour at one stage: optionally wait ``delay`` seconds, then either hang up
    (``disconnect``), reply ``code text`` instead of the normal reply, or carry on normally."""

    stage: Stage
    code: int | None = None
    text: str = "Fault injected by the test"
    disconnect: bool = False
    delay: float = 0.0

    @classmethod
    def reply(cls, stage: Stage, code: int, text: str = "Fault injected by the test") -> Fault:
        return cls(stage, code=code, text=text)

    @classmethod
    def drop(cls, stage: Stage) -> Fault:
        return cls(stage, disconnect=True)

    @classmethod
    def slow(cls, stage: Stage, seconds: float) -> Fault:
        return cls(stage, delay=seconds)

    def reply_line(self) -> str | None:
        return None if self.code is None else f"{self.code} {self.text}"


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    connection_id: int
    mail_options: tuple[str, ...]


class _SinkSMTP(SMTP):
    """aiosmtpd's server protocol with the hooks the handler API does not offer: the greeting,
    the DATA command before 354, and the middle of the message."""

    def __init__(self, sink: SmtpSink, handler: _Recorder, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sink = sink
        self.connection_id = 0
        self.counted = False
        self.gone = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS on the same protocol; count real ones only.
        fresh = self.transport is None
        super().connection_made(transport)
        if fresh:
            self.sink._connection_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.sink._connection_closed(self)
        self.gone.set()

    async def _handle_client(self) -> None:
        reply = await self.intercept(Stage.CONNECT)
        if reply is None:
            await super()._handle_client()
            return
        await self.push(reply)
        await self.hang_up(graceful=True)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is None or not self.envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            return
        reply = await self.intercept(Stage.DATA)
        if reply is not None:
            await self.push(reply)
            return
        fault = self.sink.fault
        if fault is not None and fault.stage is Stage.BODY and fault.disconnect:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readuntil(b"\r\n")
            await self.hang_up()
        await super().smtp_DATA(arg)

    async def intercept(self, stage: Stage) -> str | None:
        """Apply the sink's fault if it targets ``stage``; return a reply to send instead."""
        fault = self.sink.fault
        if fault is None or fault.stage is not stage:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.disconnect:
            await self.hang_up()
        return fault.reply_line()

    async def hang_up(self, *, graceful: bool = False) -> NoReturn:
        transport = self.transport
        if transport is not None:
            if graceful:
                transport.close()
            else:
                cast(asyncio.WriteTransport, transport).abort()
        # connection_lost() cancels this task; returning instead would let aiosmtpd carry on
        # writing replies to a dead connection.
        await self.loop.create_future()
        raise AssertionError("unreachable: the closed connection cancels this task")

    def close_now(self) -> None:
        if self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).abort()

    def tls_active(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is not None


class _Recorder:
    """aiosmtpd handler: normal replies, recording, and the fault stages the hooks cover."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        reply = await server.intercept(Stage.EHLO)
        if reply is not None:
            return [reply]
        session.host_name = hostname
        if self._sink.pipelining:
            # aiosmtpd reads commands one line at a time, so pipelined ones work; it just
            # does not say so.
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_HELO(
        self, server: _SinkSMTP, session: Session, envelope: SmtpEnvelope, hostname: str
    ) -> str:
        reply = await server.intercept(Stage.EHLO)
        if reply is not None:
            return reply
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = await server.intercept(Stage.MAIL)
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = await server.intercept(Stage.RCPT)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: _SinkSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        self._sink._count_rset()
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            tls=server.tls_active(),
            connection_id=server.connection_id,
            mail_options=tuple(envelope.mail_options),
        )
        fault = self._sink.fault
        if fault is not None and fault.stage is Stage.DOT and fault.disconnect:
            # The server has the whole message and the client will never hear about it.
            self._sink._record(message, dropped=True)
        reply = await server.intercept(Stage.DOT)
        if reply is not None:
            return reply
        queue_id = self._sink._record(message, dropped=False)
        return f"250 2.0.0 Ok: queued as {queue_id}"


class _SinkController(Controller):
    def __init__(self, sink: SmtpSink, handler: _Recorder, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        # Passing the loop keeps aiosmtpd from probing for one with warnings.catch_warnings(),
        # which is not thread-safe and would race pytest's own warning filters.
        return _SinkSMTP(self._sink, self.handler, loop=self.loop, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Controller only knows the port it was given; with port 0 ask the bound socket.
        server = cast(asyncio.Server, self.server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpSink(StartStop):
    """A started-on-demand aiosmtpd server; use as a (async) context manager or start()/stop().

    ``tls="starttls"`` offers STARTTLS and ``tls="implicit"`` wraps the whole connection, both
    with a certificate from a throwaway trustme CA (see :meth:`client_tls_context`).
    ``credentials`` (STARTTLS only) makes AUTH PLAIN/LOGIN mandatory before MAIL.
    ``pipelining`` offers PIPELINING (RFC 2920) in the EHLO reply.
    """

    def __init__(
        self,
        *,
        tls: SinkTls = "none",
        credentials: tuple[str, str] | None = None,
        fault: Fault | None = None,
        host: str = "127.0.0.1",
        server_name: str = "sink.sendkit.test",
        pipelining: bool = False,
    ) -> None:
        if credentials is not None and tls != "starttls":
            raise ValueError("credentials need tls='starttls' (aiosmtpd only offers AUTH then)")
        self.host = host
        self.fault = fault
        self.pipelining = pipelining
        self._credentials = credentials
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._dropped: list[ReceivedMessage] = []
        self._live: set[_SinkSMTP] = set()
        self._connection_ids = itertools.count(1)
        self._queue_ids = itertools.count(1)
        self._counting = False
        self._opened = 0
        self._active = 0
        self._peak = 0
        self._rsets = 0
        self._controller: _SinkController | None = None
        self.ca: trustme.CA | None = _new_ca() if tls != "none" else None
        server_context = self._server_context(server_name)
        self._controller_options: dict[str, Any] = {
            "hostname": host,
            "port": 0,
            "server_hostname": server_name,
            "ssl_context": server_context if tls == "implicit" else None,
            "tls_context": server_context if tls == "starttls" else None,
            "authenticator": self._authenticate if credentials else None,
            "auth_required": credentials is not None,
        }

    def _server_context(self, server_name: str) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(self.host, "localhost", server_name).configure_cert(context)
        return context

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("the sink is already running")
        # Built here rather than in __init__: a Controller owns an event loop from birth,
        # which would leak if the sink were never started.
        controller = _SinkController(self, _Recorder(self), **self._controller_options)
        try:
            controller.start()
        except BaseException:
            _abandon(controller)
            raise
        self._controller = controller
        with self._lock:
            # Controller.start() opens a probe connection; only count what the test causes.
            self._counting = True

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is None:
            return
        with self._lock:
            self._counting = False
        # Close sessions inside the server loop first: Controller.stop() just cancels tasks
        # and closes the loop, leaving open transports to be reported as ResourceWarnings.
        future = asyncio.run_coroutine_threadsafe(self._close_all(), controller.loop)
        try:
            future.result(timeout=_SHUTDOWN_GRACE * 2)
        finally:
            controller.stop()

    async def disconnect_all(self) -> None:
        """Drop every open client connection, as a server's idle timeout would."""
        future = asyncio.run_coroutine_threadsafe(self._close_all(), self._running().loop)
        await asyncio.wrap_future(future)

    def _running(self) -> _SinkController:
        if self._controller is None:
            raise RuntimeError("the sink is not running")
        return self._controller

    async def _close_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for server in live:
            server.close_now()
        async with asyncio.timeout(_SHUTDOWN_GRACE):
            await asyncio.gather(*(server.gone.wait() for server in live))

    # -- what the test looks at ---------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._running().port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def label(self) -> str:
        """The "host:port" form transports report in ``DeliveryResult.host``."""
        return f"{self.host}:{self.port}"

    def client_tls_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this sink's certificate."""
        if self.ca is None:
            raise RuntimeError("this sink was started without TLS")
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted with a 2xx reply."""
        with self._lock:
            return list(self._messages)

    @property
    def dropped(self) -> list[ReceivedMessage]:
        """Messages received in full but never acknowledged (``Fault.drop(Stage.DOT)``)."""
        with self._lock:
            return list(self._dropped)

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._opened

    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._active

    @property
    def max_active_connections(self) -> int:
        with self._lock:
            return self._peak

    @property
    def rset_count(self) -> int:
        with self._lock:
            return self._rsets

    def reset(self) -> None:
        """Forget recorded messages and counters (the fault stays)."""
        with self._lock:
            self._messages.clear()
            self._dropped.clear()
            self._opened = 0
            self._rsets = 0
            self._peak = self._active

    # -- called from the server thread --------------------------------------------------------

    def _connection_opened(self, server: _SinkSMTP) -> None:
        with self._lock:
            server.connection_id = next(self._connection_ids)
            self._live.add(server)
            if not self._counting:
                return
            server.counted = True
            self._opened += 1
            self._active += 1
            self._peak = max(self._peak, self._active)

    def _connection_closed(self, server: _SinkSMTP) -> None:
        with self._lock:
            self._live.discard(server)
            if server.counted:
                server.counted = False
                self._active -= 1

    def _record(self, message: ReceivedMessage, *, dropped: bool) -> int:
        with self._lock:
            (self._dropped if dropped else self._messages).append(message)
            return next(self._queue_ids)

    def _count_rset(self) -> None:
        with self._lock:
            self._rsets += 1

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self._credentials is not None
        user, password = self._credentials
        expected = LoginPassword(user.encode(), password.encode())
        return AuthResult(success=auth_data == expected, handled=False)


def _new_ca() -> trustme.CA:
    # trustme is a dev dependency; plaintext sinks must not need it.
    import trustme

    return trustme.CA()


def _abandon(controller: _SinkController) -> None:
    # Controller.start() can fail with its thread running (probe failed) or finished (bind
    # failed, loop left open); stop what runs and close what is left.
    with contextlib.suppress(Exception):
        controller.stop(no_assert=True)
    if not controller.loop.is_running() and not controller.loop.is_closed():
        controller.loop.close()


@asynccontextmanager
async def smtp_sink(
    *,
    tls: SinkTls = "none",
    credentials: tuple[str, str] | None = None,
    fault: Fault | None = None,
) -> AsyncIterator[SmtpSink]:
    """Start a :class:`SmtpSink` for the duration of the block."""
    async with SmtpSink(tls=tls, credentials=credentials, fault=fault) as sink:
        yield sink
