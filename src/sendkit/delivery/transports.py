"""SMTP transports: hand a queued, already signed message to a relay or to the recipient's MX.

Delivery outcomes are values (:class:`DeliveryResult`), never exceptions: a worker only has to
look at ``outcome`` to decide whether to mark the message sent, retry it later or bounce it.

Both transports keep a pool of open SMTP sessions per destination ("host:port"), so a burst of
messages to one destination costs one TCP/TLS/EHLO handshake rather than one per message, and
cap the number of concurrent sessions per destination so one slow destination cannot tie up
every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields
from enum import Enum, StrEnum
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, Self

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
from aiosmtplib.email import parse_address

from sendkit.delivery.pipelining import PipelinedReplies

__all__ = [
    "DeliveryResult",
    "DirectTransport",
    "DnsMxResolver",
    "Envelope",
    "MxLookupError",
    "MxResolver",
    "NoMailHostError",
    "NoSuchDomainError",
    "NullMxError",
    "Outcome",
    "RelayTransport",
    "SmtpTimeouts",
    "TemporaryLookupError",
    "Transport",
]

log = logging.getLogger(__name__)

TlsMode = Literal["none", "starttls", "tls"]


class Outcome(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"

    @classmethod
    def for_code(cls, code: int) -> Outcome:
        if 200 <= code < 300:
            return cls.DELIVERED
        if 500 <= code < 600:
            return cls.BOUNCED
        # 4xx, and whatever a confused server sends instead of a reply (aiosmtplib reports a
        # malformed reply as -1), is worth another try later.
        return cls.DEFERRED


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    rcpt_to: str
    data: bytes
    message_id: str


@dataclass(frozen=True)
class DeliveryResult:
    """What happened to one delivery attempt.

    ``code``/``text`` are the remote reply when there was one, otherwise ``code`` is None and
    ``text`` describes the local failure. ``host`` is the server the attempt ended on
    ("host:port"). ``possibly_duplicated`` is set when the connection failed after the whole
    message including the final "." had been handed to the socket but before the server's
    reply arrived (RFC 1047): the server may have accepted it, so a retry may duplicate it.
    ``tls`` says whether the SMTP session was encrypted.
    """

    outcome: Outcome
    code: int | None
    text: str
    host: str | None
    duration: float
    possibly_duplicated: bool = False
    tls: bool = False

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.DELIVERED

    @classmethod
    def from_reply(
        cls,
        code: int,
        text: str,
        *,
        host: str | None,
        duration: float,
        tls: bool = False,
    ) -> DeliveryResult:
        return cls(Outcome.for_code(code), code, text, host, duration, tls=tls)

    @classmethod
    def deferred(
        cls,
        text: str,
        *,
        code: int | None = None,
        host: str | None = None,
        duration: float = 0.0,
        possibly_duplicated: bool = False,
        tls: bool = False,
    ) -> DeliveryResult:
        return cls(Outcome.DEFERRED, code, text, host, duration, possibly_duplicated, tls)

    @classmethod
    def bounced(
        cls,
        text: str,
        *,
        code: int | None = None,
        host: str | None = None,
        duration: float = 0.0,
        tls: bool = False,
    ) -> DeliveryResult:
        return cls(Outcome.BOUNCED, code, text, host, duration, tls=tls)


@dataclass(frozen=True)
class SmtpTimeouts:
    """Per-stage client timeouts in seconds; defaults are RFC 5321 §4.5.3.2.

    How they map onto aiosmtplib, which takes one timeout per command:

    * ``connect``: TCP connect (plus the handshake for implicit TLS) and, separately, the
      220 greeting; aiosmtplib's ``connect(timeout=...)`` applies it to each.
    * ``command``: EHLO/HELO, STARTTLS including the TLS handshake, AUTH, and the RSET that
      probes a pooled connection before reuse. RFC 5321 gives no figure for these; 300 s
      matches the server-side idle timeout it recommends.
    * ``mail``, ``rcpt``: MAIL FROM and RCPT TO.
    * ``data_init``: the DATA command until the 354 reply.
    * ``data_block`` + ``final_dot``: the wait for the reply after the message was handed to
      the socket. asyncio buffers the whole message in one write and aiosmtplib has no
      per-block progress hook, so a per-block timer cannot be enforced; adding the block
      budget keeps a slow transfer from eating into the server's processing allowance.
    * ``quit``: QUIT when the transport closes. Not in the RFC; short so shutdown is bounded.
    """

    connect: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    final_dot: float = 600.0
    quit: float = 10.0

    @classmethod
    def uniform(cls, seconds: float) -> SmtpTimeouts:
        return cls(**{f.name: seconds for f in fields(cls)})

    @property
    def end_of_data(self) -> float:
        return self.data_block + self.final_dot


class Transport(Protocol):
    async def send(self, envelope: Envelope) -> DeliveryResult: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# MX resolution
# --------------------------------------------------------------------------------------------


class MxResolver(Protocol):
    """Map a recipient domain to the SMTP servers to try, best first.

    Raise an :class:`MxLookupError` subclass when the lookup itself decides the outcome.
    """

    async def resolve(self, domain: str) -> list[tuple[str, int]]: ...


class MxLookupError(Exception):
    """A DNS answer that settles the delivery without connecting anywhere."""

    outcome: ClassVar[Outcome] = Outcome.DEFERRED
    code: ClassVar[int | None] = None
    reason: ClassVar[str] = "DNS lookup failed"

    def __init__(self, domain: str, detail: str = "") -> None:
        super().__init__(domain, detail)
        self.domain = domain
        self.detail = detail

    def __str__(self) -> str:
        suffix = f" ({self.detail})" if self.detail else ""
        return f"{self.reason} for {self.domain}{suffix}"

    def to_result(self, duration: float) -> DeliveryResult:
        return DeliveryResult(self.outcome, self.code, str(self), None, duration)


class NullMxError(MxLookupError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail at all."""

    outcome = Outcome.BOUNCED
    code = 556
    reason = "5.1.10 Recipient address has null MX"


class NoSuchDomainError(MxLookupError):
    outcome = Outcome.BOUNCED
    reason = "5.1.2 Recipient domain does not exist"


class NoMailHostError(MxLookupError):
    """Neither MX nor A/AAAA records: RFC 5321 §5.1 leaves nowhere to deliver to."""

    outcome = Outcome.BOUNCED
    reason = "5.1.2 Recipient domain has no mail exchanger or address"


class TemporaryLookupError(MxLookupError):
    reason = "4.4.3 DNS lookup failed temporarily"


class _DnsResolver(Protocol):
    async def resolve(
        self, qname: str, rdtype: str, *, lifetime: float | None = None
    ) -> Iterable[Any]: ...


class DnsMxResolver:
    """MX lookup with dnspython's async resolver, following RFC 5321 §5.1 and RFC 7505."""

    def __init__(
        self,
        *,
        port: int = 25,
        resolver: _DnsResolver | None = None,
        lifetime: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._port = port
        self._resolver: _DnsResolver = resolver or dns.asyncresolver.Resolver()
        self._lifetime = lifetime
        self._rng = rng or random.Random()

    async def resolve(self, domain: str) -> list[tuple[str, int]]:
        try:
            answer = await self._query(domain, "MX")
        except dns.resolver.NoAnswer:
            return await self._implicit_mx(domain)
        return [(host, self._port) for host in _order_exchangers(answer, domain, self._rng)]

    async def _implicit_mx(self, domain: str) -> list[tuple[str, int]]:
        # RFC 5321 §5.1: no MX records means the domain itself is the (preference 0) exchanger,
        # provided it has an address at all.
        for rdtype in ("A", "AAAA"):
            try:
                await self._query(domain, rdtype)
            except dns.resolver.NoAnswer:
                continue
            return [(domain, self._port)]
        raise NoMailHostError(domain)

    async def _query(self, domain: str, rdtype: str) -> Iterable[Any]:
        try:
            return await self._resolver.resolve(domain, rdtype, lifetime=self._lifetime)
        except dns.resolver.NXDOMAIN as exc:
            raise NoSuchDomainError(domain) from exc
        except dns.resolver.NoAnswer:
            raise
        except dns.exception.DNSException as exc:
            # Timeouts, SERVFAIL (NoNameservers) and the like are the resolver's problem today,
            # not a verdict on the domain.
            raise TemporaryLookupError(domain, f"{rdtype}: {type(exc).__name__}") from exc


def _order_exchangers(records: Iterable[Any], domain: str, rng: random.Random) -> list[str]:
    by_preference: dict[int, list[str]] = {}
    saw_null_mx = False
    for record in records:
        if record.exchange == dns.name.root:
            saw_null_mx = True
            continue
        host = record.exchange.to_text(omit_final_dot=True)
        by_preference.setdefault(int(record.preference), []).append(host)
    if not by_preference:
        if saw_null_mx:
            raise NullMxError(domain)
        raise NoMailHostError(domain)
    ordered: list[str] = []
    for preference in sorted(by_preference):
        group = by_preference[preference]
        # RFC 5321 §5.1: spread load across exchangers of equal preference.
        rng.shuffle(group)
        for host in group:
            if host not in ordered:
                ordered.append(host)
    return ordered


# --------------------------------------------------------------------------------------------
# SMTP session mechanics shared by both transports
# --------------------------------------------------------------------------------------------


class _Phase(Enum):
    CONNECT = "connect"
    EHLO = "EHLO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    END_OF_DATA = "end of data"


_SESSION_PHASES = frozenset({_Phase.CONNECT, _Phase.EHLO, _Phase.STARTTLS, _Phase.AUTH})
_ENVELOPE_PHASES = frozenset({_Phase.MAIL, _Phase.RCPT, _Phase.DATA})

# OSError covers TimeoutError, ssl.SSLError and ConnectionError; ValueError is what aiosmtplib
# raises for an address it will not put on a command line.
_SMTP_FAILURES = (aiosmtplib.SMTPException, OSError, ValueError)

# RFC 4954 "authentication required": our relay configuration is wrong, not the message.
_CONFIGURATION_CODES = frozenset({530})

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# An ASCII dot-atom at a dot-separated LDH domain: the common address, which parseaddr
# (and so aiosmtplib) returns unchanged.
_DOT_ATOM_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_EHLO_UNSUPPORTED = frozenset({500, 501, 502, 504})
_RCPT_ACCEPTED = frozenset({250, 251})  # as aiosmtplib's SMTP.rcpt


@dataclass
class _Progress:
    """How far an attempt got, so a failure can be classified after the fact."""

    host: str
    phase: _Phase = _Phase.CONNECT
    tls: bool = False


@dataclass(frozen=True)
class _Attempt:
    result: DeliveryResult
    phase: _Phase
    host_unreachable: bool = False

    @property
    def reached_transaction(self) -> bool:
        return self.phase not in _SESSION_PHASES


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    host: str
    tls: bool
    reused: bool = False  # taken from the idle list: the server may have closed it since
    clean: bool = True  # no transaction left open (else RSET first)

    @property
    def pipelining(self) -> bool:
        return self.smtp.supports_extension("pipelining")


class _StaleConnection(Exception):
    """An idle session the server had closed: nothing of the message reached it."""


Opener = Callable[[_Progress], Awaitable[_Connection]]


def _elapsed(started: float) -> float:
    return time.monotonic() - started


def _host_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wire_body(data: bytes) -> bytes:
    # SMTP only knows CRLF; messages from the builder already use it, so for them (and their
    # DKIM signature) this is a no-op, found without a regex pass over the body.
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _dot_stuff(body: bytes) -> bytes:
    if not body.startswith(b".") and b"\n." not in body:
        return body
    return _LEADING_DOT.sub(b"..", body)


def _check_ehlo_name(name: str) -> None:
    if not name or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"invalid EHLO name {name!r}")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError("the connection limit must be at least 1")


def _is_plain_address(address: str) -> bool:
    # The common address is known to come back from parseaddr unchanged without it.
    return bool(_DOT_ATOM_ADDRESS.fullmatch(address)) or _parses_unchanged(address)


def _parses_unchanged(address: str) -> bool:
    if any(ord(ch) <= 32 or ord(ch) == 127 or ch in '<>"' for ch in address):
        return False
    # aiosmtplib re-parses addresses with email.utils.parseaddr, which quietly extracts
    # *some* address from malformed input; only send what would go out unchanged.
    try:
        return parse_address(address) == address
    except ValueError:
        return False


def _envelope_problem(envelope: Envelope) -> str | None:
    for role, address in (("sender", envelope.mail_from), ("recipient", envelope.rcpt_to)):
        if not _is_plain_address(address):
            return f"5.1.3 invalid {role} address {address!r}"
    if "@" not in envelope.rcpt_to:
        return f"5.1.3 recipient address {envelope.rcpt_to!r} has no domain"
    return None


def _needs_smtputf8(envelope: Envelope) -> bool:
    return not (envelope.mail_from.isascii() and envelope.rcpt_to.isascii())


async def _greet(smtp: aiosmtplib.SMTP, reply_timeout: float) -> None:
    try:
        await smtp.ehlo(timeout=reply_timeout)
    except aiosmtplib.SMTPHeloError as exc:
        # RFC 5321 §3.2: fall back to HELO only when EHLO itself is not understood; other
        # rejections (policy, 4xx) would get the same answer for HELO.
        if exc.code not in _EHLO_UNSUPPORTED or not smtp.is_connected:
            raise
        await smtp.helo(timeout=reply_timeout)


def _failure(exc: Exception, progress: _Progress, started: float) -> _Attempt:
    phase = progress.phase
    duration = _elapsed(started)
    if isinstance(exc, aiosmtplib.SMTPResponseException) and _out_of_step(exc.code, phase):
        # A 2xx or 3xx where a refusal was raised (a DATA answered 250, a reply paired
        # with the wrong command): no verdict on the message, and never "delivered".
        result = DeliveryResult.deferred(
            f"unexpected reply to {phase.value}: {exc.code} {exc.message}",
            host=progress.host,
            duration=duration,
            tls=progress.tls,
        )
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        result = _reply_result(exc.code, exc.message, progress, duration)
    elif isinstance(exc, ValueError) and not isinstance(exc, OSError):
        # (ssl.SSLCertVerificationError is both, and is no verdict on the address.)
        result = DeliveryResult.bounced(
            f"5.1.3 address rejected by the SMTP client: {exc}",
            host=progress.host,
            duration=duration,
            tls=progress.tls,
        )
    else:
        result = DeliveryResult.deferred(
            _describe(exc, phase),
            host=progress.host,
            duration=duration,
            possibly_duplicated=phase is _Phase.END_OF_DATA,
            tls=progress.tls,
        )
    unreachable = (
        phase is _Phase.CONNECT
        and isinstance(exc, aiosmtplib.SMTPConnectError | OSError)
        and not isinstance(exc, aiosmtplib.SMTPResponseException)
    )
    return _Attempt(result, phase, host_unreachable=unreachable)


def _out_of_step(code: int, phase: _Phase) -> bool:
    return phase in _ENVELOPE_PHASES and 200 <= code < 400


def _reply_result(code: int, text: str, progress: _Progress, duration: float) -> DeliveryResult:
    if progress.phase in _SESSION_PHASES or code in _CONFIGURATION_CODES:
        # A refusal before MAIL FROM is about us or the server (blocklisting, AUTH, TLS policy),
        # not about this message: retry rather than bounce, as Postfix does by default.
        return DeliveryResult.deferred(
            f"{progress.phase.value} rejected: {code} {text}",
            code=code,
            host=progress.host,
            duration=duration,
            tls=progress.tls,
        )
    garbled_after_data = progress.phase is _Phase.END_OF_DATA and not 200 <= code < 600
    return DeliveryResult(
        Outcome.for_code(code),
        code,
        text,
        progress.host,
        duration,
        possibly_duplicated=garbled_after_data,
        tls=progress.tls,
    )


def _describe(exc: Exception, phase: _Phase) -> str:
    detail = str(exc) or type(exc).__name__
    if phase is _Phase.END_OF_DATA:
        return f"no reply to the end of data ({detail}); the server may have accepted the message"
    if phase is _Phase.CONNECT:
        return f"connection failed: {detail}"
    if isinstance(exc, TimeoutError):
        return f"timed out waiting for the reply to {phase.value}"
    return f"{detail} during {phase.value}"


def _mail_options(smtp: aiosmtplib.SMTP, body: bytes, smtputf8: bool) -> list[str]:
    options: list[str] = []
    if smtp.supports_extension("size"):
        # RFC 1870: octets as transmitted, CRLFs included, dot-stuffing and final dot excluded.
        options.append(f"SIZE={len(body)}")
    if smtp.supports_extension("8bitmime") and not body.isascii():
        options.append("BODY=8BITMIME")
    if smtputf8:
        options.append("SMTPUTF8")
    return options


async def _send_data(
    smtp: aiosmtplib.SMTP, body: bytes, progress: _Progress, timeouts: SmtpTimeouts
) -> aiosmtplib.SMTPResponse:
    # Driven by hand rather than via SMTP.data(), which uses one timeout for both replies and
    # cannot tell "lost before the final dot was sent" from "lost after": only the latter may
    # leave a delivered message behind.
    start = await smtp.execute_command(b"DATA", timeout=timeouts.data_init)
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost before the message was sent")
    protocol.write(_dot_stuff(body) + b".\r\n")
    progress.phase = _Phase.END_OF_DATA
    reply = await protocol.read_response(timeout=timeouts.end_of_data)
    if reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
        smtp.close()
    return reply


async def _transact(
    conn: _Connection,
    envelope: Envelope,
    progress: _Progress,
    timeouts: SmtpTimeouts,
    started: float,
) -> DeliveryResult:
    smtp = conn.smtp
    progress.tls = conn.tls
    progress.phase = _Phase.MAIL
    smtputf8 = _needs_smtputf8(envelope)
    if smtputf8 and not smtp.supports_extension("smtputf8"):
        # RFC 6531 §3.2: a non-ASCII address must not be sent to a server without SMTPUTF8.
        return DeliveryResult.bounced(
            "5.6.7 non-ASCII address and the server does not support SMTPUTF8",
            host=conn.host,
            duration=_elapsed(started),
            tls=conn.tls,
        )
    body = _wire_body(envelope.data)
    encoding = "utf-8" if smtputf8 else "ascii"
    options = _mail_options(smtp, body, smtputf8)
    if conn.pipelining:
        return await _transact_pipelined(
            conn, envelope, (body, options, encoding), progress, timeouts, started
        )
    await smtp.mail(
        envelope.mail_from,
        options=options,
        encoding=encoding,
        timeout=timeouts.mail,
    )
    progress.phase = _Phase.RCPT
    await smtp.rcpt(envelope.rcpt_to, encoding=encoding, timeout=timeouts.rcpt)
    progress.phase = _Phase.DATA
    reply = await _send_data(smtp, body, progress, timeouts)
    return _reply_result(reply.code, reply.message, progress, _elapsed(started))


async def _transact_pipelined(
    conn: _Connection,
    envelope: Envelope,
    wire: tuple[bytes, list[str], str],  # the body, MAIL's options, the address encoding
    progress: _Progress,
    timeouts: SmtpTimeouts,
    started: float,
) -> DeliveryResult:
    """RFC 2920: [RSET,] MAIL, RCPT and DATA in one write, their replies read in order;
    then the message and its reply. Refusals raise what one command at a time raises."""
    body, options, encoding = wire
    rset = not conn.clean
    mail = f"MAIL FROM:<{envelope.mail_from}>{''.join(' ' + o for o in options)}\r\n"
    rcpt = f"RCPT TO:<{envelope.rcpt_to}>\r\n"
    with PipelinedReplies(conn.smtp) as replies:
        replies.write((b"RSET\r\n" if rset else b"") + (mail + rcpt).encode(encoding) + b"DATA\r\n")
        conn.clean = False
        if rset:
            await _reset_reply(conn, replies, timeouts.command)
        await _envelope_replies(conn, replies, envelope, progress, timeouts, first=not rset)
        replies.write(_dot_stuff(body) + b".\r\n")
        progress.phase = _Phase.END_OF_DATA
        reply = await replies.next(timeouts.end_of_data)
    conn.clean = True
    if reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
        conn.smtp.close()
    return _reply_result(reply.code, reply.message, progress, _elapsed(started))


async def _opening_reply(
    conn: _Connection, replies: PipelinedReplies, within: float
) -> aiosmtplib.SMTPResponse:
    """The first reply on a session taken from the idle list. None, or a 4xx, means the
    server had given up on the session meanwhile: nothing of this message reached it."""
    try:
        reply = await replies.next(within)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPReadTimeoutError) as exc:
        if conn.reused:
            raise _StaleConnection("closed by the server while idle") from exc
        raise
    # 421, or another 4xx such as Exchange's "451 4.7.0 Timeout waiting for client
    # input": as the RSET that used to test each idle session, try a new one.
    if conn.reused and 400 <= reply.code < 500:
        raise _StaleConnection(f"{reply.code} {reply.message}")
    return reply


async def _reset_reply(conn: _Connection, replies: PipelinedReplies, within: float) -> None:
    reply = await _opening_reply(conn, replies, within)
    if reply.code != aiosmtplib.SMTPStatus.completed:
        raise _StaleConnection(f"RSET: {reply.code} {reply.message}")


async def _envelope_replies(
    conn: _Connection,
    replies: PipelinedReplies,
    envelope: Envelope,
    progress: _Progress,
    timeouts: SmtpTimeouts,
    *,
    first: bool,
) -> None:
    """The replies to MAIL, RCPT and DATA; the first refusal among them is raised once
    the session is back in step (a session that cannot be is closed)."""
    refusal: aiosmtplib.SMTPResponseException | None = None
    steps = (
        (_Phase.MAIL, timeouts.mail),
        (_Phase.RCPT, timeouts.rcpt),
        (_Phase.DATA, timeouts.data_init),
    )
    for phase, timeout in steps:
        if refusal is None:
            progress.phase = phase
        try:
            if first and phase is _Phase.MAIL:
                reply = await _opening_reply(conn, replies, timeout)
            else:
                reply = await replies.next(timeout)
        except _SMTP_FAILURES:
            if refusal is None:
                raise
            conn.smtp.close()  # out of step: never reused
            raise refusal from None
        refusal = refusal or _refused(phase, reply, envelope)
    if refusal is None:
        return
    if reply.code == aiosmtplib.SMTPStatus.start_input:
        # A server that took DATA without a recipient: an empty message ends it.
        try:
            replies.write(b".\r\n")
            await replies.next(timeouts.end_of_data)
        except _SMTP_FAILURES:
            conn.smtp.close()
    raise refusal


def _refused(
    phase: _Phase, reply: aiosmtplib.SMTPResponse, envelope: Envelope
) -> aiosmtplib.SMTPResponseException | None:
    code, text = reply.code, reply.message
    if phase is _Phase.MAIL and code != aiosmtplib.SMTPStatus.completed:
        return aiosmtplib.SMTPSenderRefused(code, text, envelope.mail_from)
    if phase is _Phase.RCPT and code not in _RCPT_ACCEPTED:
        return aiosmtplib.SMTPRecipientRefused(code, text, envelope.rcpt_to)
    if phase is _Phase.DATA and code != aiosmtplib.SMTPStatus.start_input:
        return aiosmtplib.SMTPDataError(code, text)
    return None


def _reusable_after(exc: Exception, progress: _Progress) -> bool:
    # A plain negative reply to MAIL/RCPT/DATA leaves a healthy session (the RSET before the
    # next transaction clears it); anything else may have left it desynchronised.
    return (
        isinstance(exc, aiosmtplib.SMTPResponseException)
        and progress.phase in (_Phase.MAIL, _Phase.RCPT, _Phase.DATA)
        and 400 <= exc.code < 600
        and exc.code != aiosmtplib.SMTPStatus.domain_unavailable
    )


class _Destination:
    """Idle sessions and the concurrency cap for one "host:port"."""

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.idle: list[_Connection] = []
        self.users = 0


class _Pool:
    """Per-destination pools of open SMTP sessions.

    A destination's semaphore is held for the whole checkout-transact-checkin cycle and a new
    connection is only opened when no idle one is available, so open connections per
    destination (idle + busy) never exceed the limit.
    """

    def __init__(self, limit: int, timeouts: SmtpTimeouts) -> None:
        _check_limit(limit)
        self._limit = limit
        self._timeouts = timeouts
        self._destinations: dict[str, _Destination] = {}
        self.closed = False

    async def deliver(
        self, key: str, open_connection: Opener, envelope: Envelope, started: float
    ) -> _Attempt:
        destination = self._destinations.get(key)
        if destination is None:
            destination = self._destinations[key] = _Destination(self._limit)
        destination.users += 1
        try:
            async with destination.slots:
                return await self._deliver(destination, key, open_connection, envelope, started)
        finally:
            destination.users -= 1
            self._forget_if_unused(key, destination)

    async def _deliver(
        self,
        destination: _Destination,
        key: str,
        open_connection: Opener,
        envelope: Envelope,
        started: float,
    ) -> _Attempt:
        progress = _Progress(host=key)
        if self.closed:
            # close() ran while this send waited for a slot.
            result = DeliveryResult.deferred("transport is closed", duration=_elapsed(started))
            return _Attempt(result, progress.phase)
        conn: _Connection | None = None
        try:
            conn = await self._checkout(destination, open_connection, progress)
            try:
                result = await _transact(conn, envelope, progress, self._timeouts, started)
            except _StaleConnection:
                conn.smtp.close()
                conn = None
                progress.phase = _Phase.CONNECT
                conn = await open_connection(progress)
                result = await _transact(conn, envelope, progress, self._timeouts, started)
        except _SMTP_FAILURES as exc:
            if conn is not None and _reusable_after(exc, progress):
                self._checkin(destination, conn)
            elif conn is not None:
                conn.smtp.close()
            return _failure(exc, progress, started)
        except BaseException:
            if conn is not None:
                conn.smtp.close()
            raise
        self._checkin(destination, conn)
        return _Attempt(result, progress.phase)

    async def _checkout(
        self, destination: _Destination, open_connection: Opener, progress: _Progress
    ) -> _Connection:
        while destination.idle:
            conn = destination.idle.pop()
            conn.reused = True
            # With PIPELINING the transaction's first reply tells a closed session.
            if conn.pipelining and conn.smtp.is_connected:
                return conn
            if await self._still_usable(conn):
                return conn
        progress.phase = _Phase.CONNECT
        return await open_connection(progress)

    async def _still_usable(self, conn: _Connection) -> bool:
        # Servers drop idle sessions on their own schedule; RSET both detects that and clears
        # whatever the previous transaction left behind.
        if not conn.smtp.is_connected:
            conn.smtp.close()
            return False
        try:
            await conn.smtp.rset(timeout=self._timeouts.command)
        except (aiosmtplib.SMTPException, OSError):
            conn.smtp.close()
            return False
        except BaseException:
            conn.smtp.close()
            raise
        return True

    def _checkin(self, destination: _Destination, conn: _Connection) -> None:
        if self.closed or not conn.smtp.is_connected:
            conn.smtp.close()
        else:
            destination.idle.append(conn)

    def _forget_if_unused(self, key: str, destination: _Destination) -> None:
        # Direct delivery meets many hosts once; do not keep a semaphore for each forever.
        if destination.users == 0 and not destination.idle:
            self._destinations.pop(key, None)

    async def close(self) -> None:
        self.closed = True
        idle = [conn for dest in self._destinations.values() for conn in dest.idle]
        for dest in self._destinations.values():
            dest.idle.clear()
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    async def _quit(self, conn: _Connection) -> None:
        try:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await conn.smtp.quit(timeout=self._timeouts.quit)
        finally:
            conn.smtp.close()


class _PooledTransport:
    _pool: _Pool

    async def send(self, envelope: Envelope) -> DeliveryResult:
        started = time.monotonic()
        try:
            return await self._send(envelope, started)
        except Exception as exc:
            # A bug must not lose the message: log it loudly and let the queue retry.
            log.exception("unexpected error delivering %s", envelope.message_id)
            return DeliveryResult.deferred(
                f"internal error: {type(exc).__name__}: {exc}", duration=_elapsed(started)
            )

    async def _send(self, envelope: Envelope, started: float) -> DeliveryResult:
        raise NotImplementedError

    def _precheck(self, envelope: Envelope, started: float) -> DeliveryResult | None:
        if self._pool.closed:
            return DeliveryResult.deferred("transport is closed", duration=_elapsed(started))
        problem = _envelope_problem(envelope)
        if problem is not None:
            return DeliveryResult.bounced(problem, duration=_elapsed(started))
        return None

    async def close(self) -> None:
        """QUIT and close every pooled connection; later sends are deferred."""
        await self._pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class RelayTransport(_PooledTransport):
    """Deliver everything through one smarthost, optionally with TLS and AUTH."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMode = "none",
        tls_context: ssl.SSLContext | None = None,
        ehlo_name: str,
        max_connections: int = 10,
        timeouts: SmtpTimeouts = SmtpTimeouts(),
    ) -> None:
        if tls not in ("none", "starttls", "tls"):
            raise ValueError(f"unknown TLS mode {tls!r}")
        _check_ehlo_name(ehlo_name)
        self._host = host
        self._port = port
        self._label = _host_label(host, port)
        self._username = username
        self._password = password
        self._tls: TlsMode = tls
        # None lets aiosmtplib build a default context that verifies the relay's certificate.
        self._tls_context = tls_context
        self._ehlo_name = ehlo_name
        self._timeouts = timeouts
        self._pool = _Pool(max_connections, timeouts)

    async def _send(self, envelope: Envelope, started: float) -> DeliveryResult:
        early = self._precheck(envelope, started)
        if early is not None:
            return early
        attempt = await self._pool.deliver(self._label, self._open, envelope, started)
        return attempt.result

    async def _open(self, progress: _Progress) -> _Connection:
        smtp = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            local_hostname=self._ehlo_name,
            timeout=self._timeouts.command,
            use_tls=self._tls == "tls",
            start_tls=False,
            tls_context=self._tls_context,
        )
        try:
            await self._handshake(smtp, progress)
        except BaseException:
            smtp.close()
            raise
        return _Connection(smtp, self._label, tls=self._tls != "none")

    async def _handshake(self, smtp: aiosmtplib.SMTP, progress: _Progress) -> None:
        timeout = self._timeouts.command
        progress.tls = self._tls == "tls"
        await smtp.connect(timeout=self._timeouts.connect)
        progress.phase = _Phase.EHLO
        await _greet(smtp, timeout)
        if self._tls == "starttls":
            progress.phase = _Phase.STARTTLS
            await smtp.starttls(timeout=timeout)
            progress.tls = True
            progress.phase = _Phase.EHLO
            await _greet(smtp, timeout)
        if self._username is not None:
            progress.phase = _Phase.AUTH
            await smtp.login(self._username, self._password or "", timeout=timeout)


class _TlsHandshakeFailed(Exception):
    """STARTTLS broke the session; the caller reconnects in plaintext."""


def _opportunistic_context() -> ssl.SSLContext:
    # RFC 7435 opportunistic security: encryption against passive snooping, no authentication,
    # because most MX certificates would not verify and failing would only force plaintext.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class DirectTransport(_PooledTransport):
    """Deliver straight to the recipient domain's MX hosts.

    Hosts are tried in the resolver's order; on a connection failure or a refusal before MAIL
    FROM the next host is tried. A host whose TCP connection failed is skipped for
    ``host_backoff`` seconds. STARTTLS is used whenever offered, without certificate checks
    (``tls_context`` replaces the default unverified context); if the handshake fails the
    host is retried in plaintext. Pooling and ``max_connections_per_destination`` are per MX
    host ("host:port"), so domains hosted on the same exchanger share its connections.
    ``port`` only applies to the default resolver and to address literals; an injected
    resolver supplies its own ports.
    """

    def __init__(
        self,
        *,
        ehlo_name: str,
        resolver: MxResolver | None = None,
        max_connections_per_destination: int = 10,
        timeouts: SmtpTimeouts = SmtpTimeouts(),
        port: int = 25,
        tls_context: ssl.SSLContext | None = None,
        host_backoff: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_ehlo_name(ehlo_name)
        self._ehlo_name = ehlo_name
        self._resolver: MxResolver = resolver or DnsMxResolver(port=port)
        self._port = port
        self._timeouts = timeouts
        self._tls_context = tls_context or _opportunistic_context()
        self._host_backoff = host_backoff
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._pool = _Pool(max_connections_per_destination, timeouts)

    def down_hosts(self) -> dict[str, float]:
        """Hosts ("host:port") currently skipped, with the clock time they become eligible."""
        now = self._clock()
        return {key: until for key, until in self._down_until.items() if until > now}

    async def _send(self, envelope: Envelope, started: float) -> DeliveryResult:
        early = self._precheck(envelope, started)
        if early is not None:
            return early
        domain = envelope.rcpt_to.rpartition("@")[2].lower()
        hosts = await self._lookup(domain, started)
        if isinstance(hosts, DeliveryResult):
            return hosts
        return await self._try_hosts(domain, hosts, envelope, started)

    async def _lookup(self, domain: str, started: float) -> list[tuple[str, int]] | DeliveryResult:
        if domain.startswith("["):
            return self._literal_host(domain, started)
        try:
            hosts = await self._resolver.resolve(domain)
        except MxLookupError as exc:
            return exc.to_result(_elapsed(started))
        except dns.exception.DNSException as exc:
            return TemporaryLookupError(domain, type(exc).__name__).to_result(_elapsed(started))
        if not hosts:
            return NoMailHostError(domain).to_result(_elapsed(started))
        return hosts

    def _literal_host(self, domain: str, started: float) -> list[tuple[str, int]] | DeliveryResult:
        # RFC 5321 §4.1.3 address literal: deliver to that address, no DNS involved.
        literal = domain.removeprefix("[").removesuffix("]")
        try:
            address = ipaddress.ip_address(literal.removeprefix("ipv6:"))
        except ValueError:
            return DeliveryResult.bounced(
                f"5.1.2 invalid address literal {domain!r}", duration=_elapsed(started)
            )
        return [(str(address), self._port)]

    async def _try_hosts(
        self,
        domain: str,
        hosts: list[tuple[str, int]],
        envelope: Envelope,
        started: float,
    ) -> DeliveryResult:
        last: DeliveryResult | None = None
        skipped: list[str] = []
        for host, port in hosts:
            key = _host_label(host, port)
            if self._is_down(key):
                skipped.append(key)
                continue
            attempt = await self._pool.deliver(key, self._opener(host, port), envelope, started)
            if attempt.reached_transaction:
                return attempt.result
            if attempt.host_unreachable:
                self._down_until[key] = self._clock() + self._host_backoff
            last = attempt.result
        if last is not None:
            return last
        return DeliveryResult.deferred(
            f"4.4.1 every mail exchanger for {domain} failed recently: {', '.join(skipped)}",
            host=skipped[0] if skipped else None,
            duration=_elapsed(started),
        )

    def _is_down(self, key: str) -> bool:
        until = self._down_until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._down_until[key]
            return False
        return True

    def _opener(self, host: str, port: int) -> Opener:
        async def open_connection(progress: _Progress) -> _Connection:
            try:
                return await self._open(host, port, progress, try_tls=True)
            except _TlsHandshakeFailed:
                progress.phase = _Phase.CONNECT
                return await self._open(host, port, progress, try_tls=False)

        return open_connection

    async def _open(
        self, host: str, port: int, progress: _Progress, *, try_tls: bool
    ) -> _Connection:
        smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=self._ehlo_name,
            timeout=self._timeouts.command,
            start_tls=False,
            tls_context=self._tls_context,
        )
        try:
            tls = await self._handshake(smtp, host, progress, try_tls=try_tls)
        except BaseException:
            smtp.close()
            raise
        return _Connection(smtp, _host_label(host, port), tls=tls)

    async def _handshake(
        self, smtp: aiosmtplib.SMTP, host: str, progress: _Progress, *, try_tls: bool
    ) -> bool:
        timeout = self._timeouts.command
        await smtp.connect(timeout=self._timeouts.connect)
        progress.phase = _Phase.EHLO
        await _greet(smtp, timeout)
        if not (try_tls and smtp.supports_extension("starttls")):
            return False
        progress.phase = _Phase.STARTTLS
        if not await self._starttls(smtp, host):
            return False
        progress.tls = True
        progress.phase = _Phase.EHLO
        await _greet(smtp, timeout)
        return True

    async def _starttls(self, smtp: aiosmtplib.SMTP, host: str) -> bool:
        try:
            await smtp.starttls(server_hostname=host, timeout=self._timeouts.command)
        except aiosmtplib.SMTPResponseException:
            # A refusal (e.g. 454) leaves the plaintext session intact; carry on without TLS.
            return False
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _TlsHandshakeFailed(str(exc)) from exc
        return True
