"""SMTP transports against a real aiosmtpd sink (sendkit.testing.smtp) over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import dns.exception
import dns.rdata
import dns.resolver
import pytest

from sendkit.delivery.transports import (
    DeliveryResult,
    DirectTransport,
    DnsMxResolver,
    Envelope,
    NoMailHostError,
    NoSuchDomainError,
    NullMxError,
    Outcome,
    RelayTransport,
    SmtpTimeouts,
    TemporaryLookupError,
    Transport,
)
from sendkit.testing.smtp import Fault, SinkTls, SmtpSink, Stage

from .conftest import SinkFactory

QUICK = SmtpTimeouts.uniform(5.0)
EHLO = "client.sendkit.test"


# Every test here runs against a sink that offers PIPELINING (RFC 2920: the envelope's
# commands in one write) and one that does not (one command at a time).
@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def smtp_sink(pipelining: bool) -> AsyncIterator[SmtpSink]:
    async with SmtpSink(pipelining=pipelining) as sink:
        yield sink


@pytest.fixture
async def smtp_sink_factory(pipelining: bool) -> AsyncIterator[SinkFactory]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> SmtpSink:
            options.setdefault("pipelining", pipelining)
            return await stack.enter_async_context(SmtpSink(**options))

        yield make


def envelope(
    rcpt: str = "bob@example.net",
    data: bytes = b"Subject: hi\r\n\r\nHello.\r\n",
    mail_from: str = "alice@example.com",
) -> Envelope:
    return Envelope(mail_from=mail_from, rcpt_to=rcpt, data=data, message_id="<m1@sendkit.test>")


def relay(sink: SmtpSink, **options: Any) -> RelayTransport:
    options.setdefault("timeouts", QUICK)
    return RelayTransport(sink.host, sink.port, ehlo_name=EHLO, **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dns_error(kind: type[Exception]) -> Exception:
    # dnspython's exception constructors are untyped; build them through a typed callable.
    return kind()


class StubResolver:
    """MxResolver returning fixed hosts (or raising) per domain."""

    def __init__(self, table: dict[str, list[tuple[str, int]] | Exception]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def resolve(self, domain: str) -> list[tuple[str, int]]:
        self.lookups.append(domain)
        answer = self.table[domain]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def direct(resolver: StubResolver, **options: Any) -> DirectTransport:
    options.setdefault("timeouts", QUICK)
    return DirectTransport(ehlo_name=EHLO, resolver=resolver, **options)


# -- the happy path -------------------------------------------------------------------------


async def test_delivered_keeps_remote_reply(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DELIVERED
    assert result.code == 250
    assert result.text.startswith("2.0.0 Ok: queued as ")
    assert result.host == smtp_sink.label
    assert not result.possibly_duplicated
    assert not result.tls
    assert result.duration > 0
    [message] = smtp_sink.messages
    assert message.mail_from == "alice@example.com"
    assert message.rcpt_tos == ("bob@example.net",)
    assert message.data == b"Subject: hi\r\n\r\nHello.\r\n"


async def test_transports_satisfy_the_protocol(smtp_sink: SmtpSink) -> None:
    transports: list[Transport] = [relay(smtp_sink), direct(StubResolver({}))]
    for transport in transports:
        await transport.close()


async def test_dot_lines_arrive_intact_as_one_message(smtp_sink: SmtpSink) -> None:
    data = (
        b".leading dot on the first line\r\n"
        b"\r\n"
        b"before\r\n"
        b".\r\n"
        b"after a lone dot\r\n"
        b"..two dots\r\n"
        b".\r\n"
        b"MAIL FROM:<evil@example.com>\r\n"
        b".\r\n"
    )
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope(data=data))

    assert result.outcome is Outcome.DELIVERED
    [message] = smtp_sink.messages
    assert message.data == data


async def test_missing_final_crlf_is_added(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope(data=b"Subject: x\r\n\r\nno newline"))

    assert result.delivered
    assert smtp_sink.messages[0].data == b"Subject: x\r\n\r\nno newline\r\n"


async def test_size_and_8bitmime_are_declared(smtp_sink: SmtpSink) -> None:
    data = "Subject: x\r\n\r\nGrüße\r\n".encode()
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope(data=data))

    assert result.delivered
    [message] = smtp_sink.messages
    assert f"SIZE={len(data)}" in message.mail_options
    assert "BODY=8BITMIME" in message.mail_options
    assert message.data == data


async def test_non_ascii_recipient_uses_smtputf8(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope(rcpt="jürgen@example.net"))

    assert result.delivered
    [message] = smtp_sink.messages
    assert message.rcpt_tos == ("jürgen@example.net",)
    assert "SMTPUTF8" in message.mail_options


async def test_invalid_address_bounces_without_connecting(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope(rcpt="bob@example.net>\r\nRCPT TO:<x@y.z"))

    assert result.outcome is Outcome.BOUNCED
    assert result.code is None
    assert smtp_sink.connections_opened == 0


# -- replies and failures -------------------------------------------------------------------


@pytest.mark.parametrize("stage", [Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.DOT])
@pytest.mark.parametrize(
    ("code", "outcome"), [(451, Outcome.DEFERRED), (550, Outcome.BOUNCED), (554, Outcome.BOUNCED)]
)
async def test_transaction_replies_map_to_outcomes(
    smtp_sink: SmtpSink, stage: Stage, code: int, outcome: Outcome
) -> None:
    smtp_sink.fault = Fault.reply(stage, code, "x.y.z refused by test")
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope())

    assert result.outcome is outcome
    assert result.code == code
    assert result.text == "x.y.z refused by test"
    assert result.host == smtp_sink.label
    assert not result.possibly_duplicated
    assert smtp_sink.messages == []


@pytest.mark.parametrize("stage", [Stage.MAIL, Stage.RCPT, Stage.DATA])
async def test_a_success_reply_where_a_refusal_was_raised_defers(
    smtp_sink: SmtpSink, stage: Stage
) -> None:
    """A DATA answered 250 (or any 2xx/3xx out of step): nothing was sent, so never
    "delivered", and the session is not reused."""
    smtp_sink.fault = Fault.reply(stage, 250 if stage is Stage.DATA else 354, "2.0.0 odd")
    async with relay(smtp_sink) as transport:
        odd = await transport.send(envelope())
        smtp_sink.fault = None
        delivered = await transport.send(envelope())

    assert odd.outcome is Outcome.DEFERRED
    assert odd.text.startswith("unexpected reply to ")
    assert delivered.delivered
    assert len(smtp_sink.messages) == 1
    assert smtp_sink.connections_opened == 2


@pytest.mark.parametrize(
    ("stage", "code"), [(Stage.CONNECT, 554), (Stage.CONNECT, 421), (Stage.EHLO, 550)]
)
async def test_session_refusals_defer_even_when_permanent(
    smtp_sink: SmtpSink, stage: Stage, code: int
) -> None:
    smtp_sink.fault = Fault.reply(stage, code, "go away")
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert result.code == code
    assert "go away" in result.text


async def test_drop_mid_data_defers(smtp_sink: SmtpSink) -> None:
    smtp_sink.fault = Fault.drop(Stage.BODY)
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope(data=body * 2000))

    assert result.outcome is Outcome.DEFERRED
    assert result.code is None
    assert smtp_sink.messages == []
    assert smtp_sink.dropped == []


async def test_drop_after_final_dot_is_possibly_duplicated(smtp_sink: SmtpSink) -> None:
    smtp_sink.fault = Fault.drop(Stage.DOT)
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert result.possibly_duplicated
    assert result.code is None
    assert smtp_sink.messages == []
    assert len(smtp_sink.dropped) == 1  # the server did get it: a retry would duplicate


@pytest.mark.parametrize("stage", [Stage.MAIL, Stage.RCPT, Stage.DATA])
async def test_drop_before_the_message_is_sent_is_not_duplicated(
    smtp_sink: SmtpSink, stage: Stage
) -> None:
    smtp_sink.fault = Fault.drop(stage)
    async with relay(smtp_sink) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert not result.possibly_duplicated


@pytest.mark.parametrize(
    ("stage", "duplicated"),
    [(Stage.CONNECT, False), (Stage.MAIL, False), (Stage.RCPT, False), (Stage.DOT, True)],
)
async def test_slow_reply_beyond_the_timeout_defers(
    smtp_sink: SmtpSink, stage: Stage, duplicated: bool
) -> None:
    smtp_sink.fault = Fault.slow(stage, 2.0)
    async with relay(smtp_sink, timeouts=SmtpTimeouts.uniform(0.2)) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert result.code is None
    assert result.possibly_duplicated is duplicated
    assert result.duration < 1.5


async def test_timeouts_are_per_stage(smtp_sink: SmtpSink) -> None:
    # 0.5 s after the final dot is fine when only MAIL has a tight limit.
    smtp_sink.fault = Fault.slow(Stage.DOT, 0.5)
    timeouts = SmtpTimeouts(connect=5, command=5, mail=0.2, rcpt=0.2, data_init=0.2)
    async with relay(smtp_sink, timeouts=timeouts) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DELIVERED


async def test_connection_refused_defers() -> None:
    port = closed_port()
    async with RelayTransport("127.0.0.1", port, ehlo_name=EHLO, timeouts=QUICK) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert result.code is None
    assert result.host == f"127.0.0.1:{port}"
    assert not result.possibly_duplicated


async def test_send_after_close_defers(smtp_sink: SmtpSink) -> None:
    transport = relay(smtp_sink)
    await transport.close()

    result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert smtp_sink.connections_opened == 0


# -- connection pool ------------------------------------------------------------------------


async def test_sequential_messages_reuse_one_connection(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        results = [await transport.send(envelope(rcpt=f"u{i}@example.net")) for i in range(20)]

    assert all(r.delivered for r in results)
    assert smtp_sink.connections_opened == 1
    assert len({m.connection_id for m in smtp_sink.messages}) == 1
    # One at a time, an RSET tests each reused session; pipelined, the transaction's first
    # reply does, and RSET is only sent after a transaction left unfinished.
    assert smtp_sink.rset_count == (0 if smtp_sink.pipelining else 19)


async def test_concurrent_messages_stay_within_the_limit(smtp_sink: SmtpSink) -> None:
    smtp_sink.fault = Fault.slow(Stage.DOT, 0.05)
    async with relay(smtp_sink, max_connections=3) as transport:
        results = await asyncio.gather(
            *(transport.send(envelope(rcpt=f"u{i}@example.net")) for i in range(20))
        )

    assert all(r.delivered for r in results)
    assert len(smtp_sink.messages) == 20
    assert smtp_sink.connections_opened <= 3
    assert smtp_sink.max_active_connections <= 3


async def test_close_quits_pooled_connections(smtp_sink: SmtpSink) -> None:
    transport = relay(smtp_sink)
    await transport.send(envelope())
    assert smtp_sink.active_connections == 1

    await transport.close()

    for _ in range(100):
        if smtp_sink.active_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert smtp_sink.active_connections == 0


async def test_connection_closed_by_server_is_replaced(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        first = await transport.send(envelope())
        await smtp_sink.disconnect_all()
        second = await transport.send(envelope())

    assert first.delivered
    assert second.delivered
    assert smtp_sink.connections_opened == 2


async def test_connection_is_discarded_after_a_failure(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        smtp_sink.fault = Fault.drop(Stage.MAIL)
        failed = await transport.send(envelope())
        smtp_sink.fault = None
        delivered = await transport.send(envelope())

    assert failed.outcome is Outcome.DEFERRED
    assert delivered.delivered
    assert smtp_sink.connections_opened == 2


async def test_connection_is_kept_after_a_rejection(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink) as transport:
        smtp_sink.fault = Fault.reply(Stage.RCPT, 550, "5.1.1 no such user")
        rejected = await transport.send(envelope())
        smtp_sink.fault = None
        delivered = await transport.send(envelope())

    assert rejected.outcome is Outcome.BOUNCED
    assert delivered.delivered
    assert smtp_sink.connections_opened == 1
    assert smtp_sink.rset_count == 1  # the refused transaction is cleared before the next


async def test_cancelled_send_releases_its_connection_slot(smtp_sink: SmtpSink) -> None:
    smtp_sink.fault = Fault.slow(Stage.DOT, 5.0)
    async with relay(smtp_sink, max_connections=1) as transport:
        stuck = asyncio.create_task(transport.send(envelope()))
        await asyncio.sleep(0.2)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        smtp_sink.fault = None
        result = await asyncio.wait_for(transport.send(envelope()), 2.0)

    assert result.delivered
    assert smtp_sink.connections_opened == 2


async def test_slow_destination_does_not_starve_others(smtp_sink_factory: SinkFactory) -> None:
    slow = await smtp_sink_factory(fault=Fault.slow(Stage.DOT, 0.5))
    fast = await smtp_sink_factory()
    resolver = StubResolver({"slow.test": [slow.address], "fast.test": [fast.address]})

    async with direct(resolver, max_connections_per_destination=2) as transport:
        slow_sends = [transport.send(envelope(rcpt=f"u{i}@slow.test")) for i in range(6)]
        fast_sends = [transport.send(envelope(rcpt=f"u{i}@fast.test")) for i in range(3)]
        results = await asyncio.gather(*slow_sends, *fast_sends)

    slow_results, fast_results = results[:6], results[6:]
    assert all(r.delivered for r in results)
    assert slow.max_active_connections == 2
    assert slow.connections_opened == 2
    assert max(r.duration for r in fast_results) < min(r.duration for r in slow_results)


# -- TLS and AUTH on the relay --------------------------------------------------------------


async def test_starttls_relay(smtp_sink_factory: SinkFactory) -> None:
    sink = await smtp_sink_factory(tls="starttls")
    async with relay(sink, tls="starttls", tls_context=sink.client_tls_context()) as transport:
        results = [await transport.send(envelope()) for _ in range(2)]

    assert all(r.delivered and r.tls for r in results)
    assert all(m.tls for m in sink.messages)
    assert sink.connections_opened == 1


async def test_starttls_relay_verifies_the_certificate(smtp_sink_factory: SinkFactory) -> None:
    sink = await smtp_sink_factory(tls="starttls")
    untrusting = ssl.create_default_context()
    async with relay(sink, tls="starttls", tls_context=untrusting) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert sink.messages == []


async def test_starttls_relay_defers_when_not_offered(smtp_sink: SmtpSink) -> None:
    async with relay(smtp_sink, tls="starttls") as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert "STARTTLS" in result.text
    assert smtp_sink.messages == []


async def test_implicit_tls_relay(smtp_sink_factory: SinkFactory) -> None:
    sink = await smtp_sink_factory(tls="implicit")
    async with relay(sink, tls="tls", tls_context=sink.client_tls_context()) as transport:
        result = await transport.send(envelope())

    assert result.delivered
    assert result.tls
    assert sink.messages[0].tls


async def test_relay_authenticates(smtp_sink_factory: SinkFactory) -> None:
    sink = await smtp_sink_factory(tls="starttls", credentials=("app", "s3cret"))
    context = sink.client_tls_context()
    async with relay(
        sink, tls="starttls", tls_context=context, username="app", password="s3cret"
    ) as transport:
        result = await transport.send(envelope())

    assert result.delivered


@pytest.mark.parametrize(("username", "code"), [("app", 535), (None, 530)])
async def test_relay_auth_problems_defer(
    smtp_sink_factory: SinkFactory, username: str | None, code: int
) -> None:
    sink = await smtp_sink_factory(tls="starttls", credentials=("app", "s3cret"))
    context = sink.client_tls_context()
    async with relay(
        sink, tls="starttls", tls_context=context, username=username, password="wrong"
    ) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert result.code == code
    assert sink.messages == []


# -- direct delivery ------------------------------------------------------------------------


async def test_direct_delivers_to_the_resolved_host(smtp_sink: SmtpSink) -> None:
    resolver = StubResolver({"example.net": [smtp_sink.address]})
    async with direct(resolver) as transport:
        result = await transport.send(envelope(rcpt="bob@Example.NET"))

    assert result.delivered
    assert result.host == smtp_sink.label
    assert resolver.lookups == ["example.net"]
    assert smtp_sink.messages[0].rcpt_tos == ("bob@Example.NET",)


async def test_direct_uses_mx_order(smtp_sink_factory: SinkFactory) -> None:
    primary = await smtp_sink_factory()
    backup = await smtp_sink_factory()
    resolver = StubResolver({"example.net": [primary.address, backup.address]})
    async with direct(resolver) as transport:
        results = [await transport.send(envelope()) for _ in range(3)]

    assert all(r.host == primary.label for r in results)
    assert len(primary.messages) == 3
    assert backup.connections_opened == 0


async def test_direct_skips_a_down_host_until_the_backoff_expires(smtp_sink: SmtpSink) -> None:
    dead = ("127.0.0.1", closed_port())
    dead_label = f"{dead[0]}:{dead[1]}"
    resolver = StubResolver({"example.net": [dead, smtp_sink.address]})
    clock = FakeClock()
    async with direct(resolver, host_backoff=300, clock=clock) as transport:
        first = await transport.send(envelope())
        assert transport.down_hosts() == {dead_label: 1300.0}

        clock.now = 1100.0
        second = await transport.send(envelope())
        # Not retried: a retry that failed again would have pushed the deadline to 1400.
        assert transport.down_hosts() == {dead_label: 1300.0}

        clock.now = 1301.0
        third = await transport.send(envelope())
        assert transport.down_hosts() == {dead_label: 1601.0}

    assert all(r.delivered and r.host == smtp_sink.label for r in (first, second, third))


async def test_direct_tries_the_next_host_after_a_4xx_greeting(
    smtp_sink_factory: SinkFactory,
) -> None:
    busy = await smtp_sink_factory(fault=Fault.reply(Stage.CONNECT, 421, "4.3.2 busy"))
    spare = await smtp_sink_factory()
    resolver = StubResolver({"example.net": [busy.address, spare.address]})
    async with direct(resolver) as transport:
        result = await transport.send(envelope())
        assert transport.down_hosts() == {}

    assert result.delivered
    assert result.host == spare.label


async def test_direct_does_not_try_the_next_host_after_a_transaction_reply(
    smtp_sink_factory: SinkFactory,
) -> None:
    refusing = await smtp_sink_factory(fault=Fault.reply(Stage.RCPT, 450, "4.2.1 try later"))
    spare = await smtp_sink_factory()
    resolver = StubResolver({"example.net": [refusing.address, spare.address]})
    async with direct(resolver) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.DEFERRED
    assert result.code == 450
    assert spare.connections_opened == 0


async def test_direct_defers_when_every_host_fails() -> None:
    hosts = [("127.0.0.1", closed_port()), ("127.0.0.1", closed_port())]
    resolver = StubResolver({"example.net": hosts})
    async with direct(resolver) as transport:
        first = await transport.send(envelope())
        second = await transport.send(envelope())

    assert first.outcome is Outcome.DEFERRED
    assert first.host == f"127.0.0.1:{hosts[1][1]}"
    assert second.outcome is Outcome.DEFERRED
    assert "failed recently" in second.text


@pytest.mark.parametrize(
    ("error", "outcome", "code"),
    [
        (NullMxError("example.net"), Outcome.BOUNCED, 556),
        (NoSuchDomainError("example.net"), Outcome.BOUNCED, None),
        (NoMailHostError("example.net"), Outcome.BOUNCED, None),
        (TemporaryLookupError("example.net", "SERVFAIL"), Outcome.DEFERRED, None),
        (dns_error(dns.exception.Timeout), Outcome.DEFERRED, None),
    ],
)
async def test_direct_dns_outcomes(error: Exception, outcome: Outcome, code: int | None) -> None:
    async with direct(StubResolver({"example.net": error})) as transport:
        result = await transport.send(envelope())

    assert result.outcome is outcome
    assert result.code == code
    assert result.host is None


async def test_direct_with_no_hosts_bounces() -> None:
    async with direct(StubResolver({"example.net": []})) as transport:
        result = await transport.send(envelope())

    assert result.outcome is Outcome.BOUNCED


async def test_direct_address_literal_skips_dns(smtp_sink: SmtpSink) -> None:
    resolver = StubResolver({})
    async with direct(resolver, port=smtp_sink.port) as transport:
        result = await transport.send(envelope(rcpt="postmaster@[127.0.0.1]"))

    assert result.delivered
    assert resolver.lookups == []


async def test_direct_uses_opportunistic_starttls(smtp_sink_factory: SinkFactory) -> None:
    # The sink's certificate comes from a CA nobody trusts: opportunistic TLS uses it anyway.
    sink = await smtp_sink_factory(tls="starttls")
    async with direct(StubResolver({"example.net": [sink.address]})) as transport:
        result = await transport.send(envelope())

    assert result.delivered
    assert result.tls
    assert sink.messages[0].tls


async def test_direct_falls_back_to_plaintext_when_tls_fails(
    smtp_sink_factory: SinkFactory,
) -> None:
    sink = await smtp_sink_factory(tls="starttls")
    verifying = ssl.create_default_context()  # rejects the sink's certificate
    resolver = StubResolver({"example.net": [sink.address]})
    async with direct(resolver, tls_context=verifying) as transport:
        result = await transport.send(envelope())

    assert result.delivered
    assert not result.tls
    assert not sink.messages[0].tls
    assert sink.connections_opened == 2


# -- DnsMxResolver against a fake dnspython resolver -----------------------------------------


class FakeDns:
    """Stands in for dns.asyncresolver.Resolver; unknown questions get NoAnswer."""

    def __init__(self, answers: dict[tuple[str, str], list[str] | Exception]) -> None:
        self.answers = answers

    async def resolve(self, qname: str, rdtype: str, *, lifetime: float | None = None) -> Any:
        answer = self.answers.get((qname, rdtype), dns_error(dns.resolver.NoAnswer))
        if isinstance(answer, Exception):
            raise answer
        return [dns.rdata.from_text("IN", rdtype, text) for text in answer]


def mx_resolver(answers: dict[tuple[str, str], list[str] | Exception]) -> DnsMxResolver:
    return DnsMxResolver(resolver=FakeDns(answers), rng=random.Random(7))


async def test_mx_preference_order_with_shuffled_ties() -> None:
    records = ["20 backup.example.net.", "10 a.example.net.", "10 b.example.net."]
    resolver = mx_resolver({("example.net", "MX"): records})

    seen: set[tuple[str, ...]] = set()
    for _ in range(40):
        hosts = await resolver.resolve("example.net")
        assert hosts[-1] == ("backup.example.net", 25)
        assert {h for h, _ in hosts[:2]} == {"a.example.net", "b.example.net"}
        seen.add(tuple(h for h, _ in hosts))
    assert len(seen) == 2


async def test_null_mx() -> None:
    resolver = mx_resolver({("example.net", "MX"): ["0 ."]})
    with pytest.raises(NullMxError) as caught:
        await resolver.resolve("example.net")

    result = caught.value.to_result(0.0)
    assert (result.outcome, result.code) == (Outcome.BOUNCED, 556)


@pytest.mark.parametrize("rdtype", ["A", "AAAA"])
async def test_no_mx_falls_back_to_the_domain_address(rdtype: str) -> None:
    address = "192.0.2.1" if rdtype == "A" else "2001:db8::1"
    resolver = mx_resolver({("example.net", rdtype): [address]})

    assert await resolver.resolve("example.net") == [("example.net", 25)]


@pytest.mark.parametrize(
    ("answers", "error"),
    [
        ({}, NoMailHostError),
        ({("example.net", "MX"): dns_error(dns.resolver.NXDOMAIN)}, NoSuchDomainError),
        ({("example.net", "MX"): dns_error(dns.resolver.LifetimeTimeout)}, TemporaryLookupError),
        ({("example.net", "MX"): dns_error(dns.resolver.NoNameservers)}, TemporaryLookupError),
        ({("example.net", "A"): dns_error(dns.exception.Timeout)}, TemporaryLookupError),
    ],
)
async def test_mx_lookup_failures(
    answers: dict[tuple[str, str], list[str] | Exception], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await mx_resolver(answers).resolve("example.net")


def test_outcome_for_code() -> None:
    codes: Iterable[tuple[int, Outcome]] = [
        (250, Outcome.DELIVERED),
        (421, Outcome.DEFERRED),
        (452, Outcome.DEFERRED),
        (550, Outcome.BOUNCED),
        (-1, Outcome.DEFERRED),
    ]
    for code, outcome in codes:
        result = DeliveryResult.from_reply(code, "text", host=None, duration=0.0)
        assert result.outcome is outcome


# -- pipelining (RFC 2920), against scripted servers ------------------------------------------

Script = Any  # async (reader, writer, connection number) -> None


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, int]]:
    """A server that greets, offers PIPELINING and leaves each session to `script`."""
    opened = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        writer.write(b"220 scripted ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n")
        try:
            await script(reader, writer, opened)
        finally:
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    async with server:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]


async def read_until(reader: asyncio.StreamReader, end: bytes) -> tuple[bytes, int]:
    """What arrives up to `end`, and in how many reads."""
    data, reads = b"", 0
    while not data.endswith(end):
        chunk = await reader.read(65536)
        assert chunk, f"closed before {end!r}: {data!r}"
        data, reads = data + chunk, reads + 1
    return data, reads


def scripted_relay(address: tuple[str, int]) -> RelayTransport:
    return RelayTransport(address[0], address[1], ehlo_name=EHLO, timeouts=QUICK)


async def test_pipelining_writes_the_envelope_at_once_and_reads_replies_sent_together() -> None:
    seen: list[tuple[bytes, int]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        # Nothing is answered until MAIL, RCPT and DATA are all in: a client that waits
        # for each reply would wait here forever.
        seen.append(await read_until(reader, b"DATA\r\n"))
        writer.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with .\r\n")
        seen.append(await read_until(reader, b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 Ok: queued as P1\r\n")
        await reader.read()

    async with scripted(script) as address, scripted_relay(address) as transport:
        result = await asyncio.wait_for(transport.send(envelope()), 10)

    assert result.delivered and result.text == "2.0.0 Ok: queued as P1"
    (commands, reads), (message, _) = seen
    assert reads == 1
    assert commands.startswith(b"MAIL FROM:<alice@example.com> SIZE=")
    assert commands.endswith(b"\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
    assert message == b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


async def test_pipelining_ends_a_data_accepted_without_a_recipient() -> None:
    """A server may answer DATA with 354 though it refused the recipient: the client
    ends that message empty, reports the refusal, and the session stays usable."""
    sent: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        sent.append((await read_until(reader, b"DATA\r\n"))[0])
        writer.write(b"250 Ok\r\n550 5.1.1 No such user\r\n354 Go ahead\r\n")
        sent.append((await read_until(reader, b".\r\n"))[0])
        writer.write(b"554 5.5.1 No valid recipients\r\n")
        sent.append((await read_until(reader, b"DATA\r\n"))[0])
        writer.write(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 Go ahead\r\n")
        await read_until(reader, b"\r\n.\r\n")
        writer.write(b"250 Ok: queued\r\n")
        await reader.read()

    async with scripted(script) as address, scripted_relay(address) as transport:
        refused = await asyncio.wait_for(transport.send(envelope()), 10)
        delivered = await asyncio.wait_for(transport.send(envelope()), 10)

    assert refused.outcome is Outcome.BOUNCED
    assert (refused.code, refused.text) == (550, "5.1.1 No such user")
    assert sent[1] == b".\r\n"
    assert sent[2].startswith(b"RSET\r\nMAIL FROM:")  # cleared, on the same session
    assert delivered.delivered


@pytest.mark.parametrize(
    "goodbye",
    [b"421 4.4.2 Idle too long, closing\r\n", b"451 4.7.0 Timeout waiting for client input\r\n"],
)
async def test_pipelining_replaces_a_session_the_server_closed_while_idle(goodbye: bytes) -> None:
    """The first reply on a reused session is a 4xx (an idle timeout): the message goes
    on a new session, as if the old one had never been picked."""
    sessions: list[int] = []

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_until(reader, b"DATA\r\n")
        writer.write(b"250 Ok\r\n250 Ok\r\n354 Go ahead\r\n")
        await read_until(reader, b"\r\n.\r\n")
        writer.write(b"250 Ok: queued\r\n")

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        sessions.append(n)
        await one(reader, writer)
        if n == 1:
            await read_until(reader, b"DATA\r\n")
            writer.write(goodbye)
            return
        await reader.read()

    async with scripted(script) as address, scripted_relay(address) as transport:
        first = await asyncio.wait_for(transport.send(envelope()), 10)
        second = await asyncio.wait_for(transport.send(envelope()), 10)

    assert first.delivered
    assert second.delivered
    assert sessions == [1, 2]


@pytest.mark.parametrize("tls", ["none", "starttls", "tls"])
def test_pipelining_on_uvloop(tls: Literal["none", "starttls", "tls"]) -> None:
    """Production delivers on uvloop, whose transports hand over to another protocol
    their own way (plain and TLS): the same exchange there, failures included."""
    import uvloop

    sink_tls: SinkTls = "implicit" if tls == "tls" else tls

    async def main() -> None:
        async with SmtpSink(tls=sink_tls, pipelining=True) as sink:
            context = sink.client_tls_context() if tls != "none" else None
            async with relay(sink, tls=tls, tls_context=context) as transport:
                sink.fault = Fault.reply(Stage.RCPT, 550, "5.1.1 no such user")
                refused = await transport.send(envelope())
                sink.fault = None
                delivered = [await transport.send(envelope()) for _ in range(3)]
            assert refused.outcome is Outcome.BOUNCED and refused.code == 550
            assert all(r.delivered and r.tls == (tls != "none") for r in delivered)
            assert sink.connections_opened == 1
            assert len(sink.messages) == 3
            assert sink.rset_count == 1  # pipelined: only after the refusal (else 3)

    uvloop.run(main())


async def test_pipelining_defers_replies_out_of_step() -> None:
    """Three 250s (a stray line shifted every reply by one): DATA was never accepted,
    nothing is sent, and the session is dropped."""
    sessions: list[int] = []
    sent: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        sessions.append(n)
        await read_until(reader, b"DATA\r\n")
        writer.write(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n")
        sent.append(await reader.read())

    async with scripted(script) as address, scripted_relay(address) as transport:
        odd = await asyncio.wait_for(transport.send(envelope()), 10)
        again = await asyncio.wait_for(transport.send(envelope()), 10)

    assert odd.outcome is Outcome.DEFERRED and again.outcome is Outcome.DEFERRED
    assert odd.text == "unexpected reply to DATA: 250 Ok"
    assert sent and set(sent) == {b""}  # no message body after those replies
    assert sessions == [1, 2]
