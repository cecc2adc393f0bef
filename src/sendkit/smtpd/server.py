"""The SMTP server around `Handler`: AUTH checked against API keys, STARTTLS, lifecycle.

aiosmtpd calls its authenticator synchronously, and an API key lookup is a database
query; so AUTH PLAIN/LOGIN keep aiosmtpd's own parsing, accept the credentials for later
with a trivial authenticator, and are then checked here, awaited, before the reply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from sendkit import keys, logs
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.errors import InvalidSignature, SendKitError
from sendkit.migrate import migrate
from sendkit.services import Services
from sendkit.smtpd.handler import Handler
from sendkit.smtpd.replies import reply_for

log = logs.get("sendkit.smtpd")

_REQUIRES_SIGNATURE = "535 5.7.8 This API key requires signed requests, which SMTP cannot carry"
# AUTH tries per connection; the rest generous enough for long submission sessions.
_CALL_LIMITS = {"AUTH": 3, "*": 10_000}


def _hold_credentials(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    return AuthResult(success=True, handled=False, auth_data=auth_data)


class SendKitSMTP(SMTP):
    def __init__(self, handler: Handler, *, owner: SmtpServer, **kwargs: Any) -> None:
        super().__init__(handler, authenticator=_hold_credentials, **kwargs)
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self.transport is None  # aiosmtpd calls this again after STARTTLS
        super().connection_made(transport)
        if fresh:
            self._owner.live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._owner.live.discard(self)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, result: AuthResult) -> AuthResult:
        """The password is an API key: the same lookup as `Authorization: Bearer`."""
        if not result.success or not isinstance(result.auth_data, LoginPassword):
            return result
        token = bytes(result.auth_data.password).decode("utf-8", "replace").strip()
        services = self._owner.services
        try:
            key = await keys.authenticate(services.db, services.box, token)
        except InvalidSignature:
            return AuthResult(success=False, handled=False)  # 535 5.7.8, as the map says
        except SendKitError as exc:
            return AuthResult(success=False, handled=False, message=reply_for(exc))
        if key.require_signature:
            return AuthResult(success=False, handled=False, message=_REQUIRES_SIGNATURE)
        log.info("smtp_auth", key_prefix=key.prefix, account_id=key.account.id)
        return AuthResult(success=True, handled=False, auth_data=key)

    def tls_active(self) -> bool:
        return self._tls_protocol is not None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.smtpd_tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.smtpd_tls_cert, settings.smtpd_tls_key)
    return context


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class SmtpServer:
    """`await start(host, port)` on the running loop (port 0 picks one), `await stop()`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.handler = Handler(services)
        self.tls = tls_context(services.settings)
        self.live: set[SendKitSMTP] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    def _protocol(self) -> SendKitSMTP:
        settings = self.services.settings
        return SendKitSMTP(
            self.handler,
            owner=self,
            hostname=settings.ehlo_name,
            ident="SendKit ESMTP",
            tls_context=self.tls,
            # With a certificate, credentials never cross the network in the clear.
            auth_require_tls=self.tls is not None,
            data_size_limit=settings.smtpd_max_message_size,
            command_call_limit=_CALL_LIMITS,
            loop=asyncio.get_running_loop(),
        )

    async def start(self, host: str, port: int) -> None:
        if self.tls is None and not _is_loopback(host):
            log.warning(
                "smtpd_without_tls",
                host=host,
                hint="set SENDKIT_SMTPD_TLS_CERT and SENDKIT_SMTPD_TLS_KEY: AUTH would "
                "carry API keys in the clear",
            )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("smtpd_listening", host=host, port=self.port, starttls=self.tls is not None)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = []
        for protocol in list(self.live):
            if protocol.transport is not None:
                protocol.transport.close()
            if protocol._handler_coroutine is not None:
                tasks.append(protocol._handler_coroutine)
        # connection_lost cancels each session's task; wait for them to be gone.
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()


async def run(settings: Settings) -> None:
    """`sendkit smtpd`: until SIGTERM or SIGINT."""
    services = services_mod.build(settings)
    try:
        await migrate(services.db)
        server = SmtpServer(services)
        await server.start(settings.smtpd_host, settings.smtpd_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("smtpd_stopping")
        await server.stop()
    finally:
        await services.close()
