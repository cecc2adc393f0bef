"""Bounces and complaints through `sendkit smtpd`: a message goes out through a real SMTP
relay (the aiosmtpd sink), then a DSN (RFC 3464) or an ARF report (RFC 5965) about it is
injected over SMTP to its VERP address, and recorded against it. Both databases."""

from __future__ import annotations

import asyncio
import secrets
import smtplib
from pathlib import Path

import pytest

from sendkit import bounces, messages
from sendkit.services import Services
from sendkit.testing.smtp import ReceivedMessage, SmtpSink
from tests.integration.eventkit import api, opened, send, smtpd, status_is, tenant_for, workers
from tests.integration.webhook_receiver import WebhookReceiver


def dsn(
    verp: str,
    original: bytes,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 <gone@example.net>: Recipient address rejected",
) -> bytes:
    headers = original.split(b"\r\n\r\n", 1)[0].decode()
    text = f"""From: MAILER-DAEMON@mx.example.net
To: {verp}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
 boundary="DSN-BOUNDARY"

--DSN-BOUNDARY
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not be delivered.

--DSN-BOUNDARY
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
Arrival-Date: Thu, 26 Nov 2026 11:00:00 +0000 (UTC)

Final-Recipient: rfc822; gone@example.net
Original-Recipient: rfc822;gone@example.net
Action: {action}
Status: {status}
Remote-MTA: dns; mx2.example.net
Diagnostic-Code: {diagnostic}

--DSN-BOUNDARY
Content-Type: text/rfc822-headers

{headers}

--DSN-BOUNDARY--
"""
    return text.replace("\n", "\r\n").encode()


def arf(to: str, original: bytes, feedback_type: str = "abuse") -> bytes:
    head = f"""From: feedback@isp.example
To: {to}
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
 boundary="ARF-BOUNDARY"

--ARF-BOUNDARY
Content-Type: text/plain; charset=us-ascii

This is an email abuse report for an email message received from IP 192.0.2.1.

--ARF-BOUNDARY
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: ExampleFBL/1.0
Version: 1
Original-Rcpt-To: <gone@example.net>
Arrival-Date: Thu, 26 Nov 2026 11:00:00 +0000

--ARF-BOUNDARY
Content-Type: message/rfc822
Content-Disposition: inline

"""
    tail = "\n--ARF-BOUNDARY--\n"
    return head.replace("\n", "\r\n").encode() + original + tail.replace("\n", "\r\n").encode()


async def inject(port: int, rcpt: str, data: bytes) -> None:
    def go() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("", [rcpt], data)

    await asyncio.to_thread(go)


async def rcpt_reply(port: int, rcpt: str) -> tuple[int, bytes]:
    def go() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            smtp.mail("")
            return smtp.rcpt(rcpt)

    return await asyncio.to_thread(go)


async def sent_through_relay(
    services: Services, sink: SmtpSink, to: str = "gone@example.net"
) -> tuple[str, ReceivedMessage]:
    async with api(services) as client:
        tenant = await tenant_for(services)
        message_id = await send(client, tenant, to=to)
    async with workers(services, webhooks=False):
        await status_is(services, message_id, "delivered")
    (received,) = sink.messages
    assert received.mail_from == f"b+{message_id}@bounces.example.com"
    return message_id, received


async def test_dsn_records_a_hard_bounce(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    async with opened(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    ) as services:
        message_id, received = await sent_through_relay(services, smtp_sink)
        async with smtpd(services) as server:
            report = dsn(received.mail_from, received.data)
            await inject(server.port, received.mail_from, report)
            await inject(server.port, received.mail_from, report)  # the same DSN again
        found = await messages.find(services.db, message_id)
        assert found is not None
        assert found["status"] == "bounced"
        assert found["last_code"] == 550
        assert [e["type"] for e in found["events"]] == ["queued", "delivered", "bounced"]
        data = found["events"][-1]["data"]
        assert data["status"] == "5.1.1" and data["hard"] is True and data["source"] == "dsn"
        async with api(services) as client:
            tenant_auth = await _auth_for(services, found["account_id"])
            listed = await client.get("/v1/suppressions", headers=tenant_auth)
        assert [(s["emailAddress"], s["reason"]) for s in listed.json()["data"]["list"]] == [
            ("gone@example.net", "hard_bounce")
        ]


async def test_delayed_dsn_is_only_noted(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    async with opened(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    ) as services:
        message_id, received = await sent_through_relay(services, smtp_sink)
        async with smtpd(services) as server:
            report = dsn(
                received.mail_from,
                received.data,
                action="delayed",
                status="4.4.1",
                diagnostic="smtp; 451 4.4.1 try again later",
            )
            await inject(server.port, received.mail_from, report)
        found = await messages.find(services.db, message_id)
        assert found is not None and found["status"] == "delivered"
        assert [e["type"] for e in found["events"]] == ["queued", "delivered", "deferred"]
        assert found["events"][-1]["data"]["hard"] is False


@pytest.mark.parametrize("via", ["verp", "feedback-address"])
async def test_arf_records_a_complaint(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink, via: str
) -> None:
    async with (
        WebhookReceiver() as receiver,
        opened(tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port) as services,
    ):
        message_id, received = await sent_through_relay(services, smtp_sink)
        account_id = (await messages.find(services.db, message_id) or {})["account_id"]
        auth = await _auth_for(services, account_id)
        async with api(services) as client:
            hook = await client.post(
                "/v1/webhooks", json={"url": receiver.url(), "events": "complained"}, headers=auth
            )
        receiver.secret = hook.json()["data"]["secret"]
        # Feedback loops mail a fixed address; the original's Message-ID finds the message.
        rcpt = received.mail_from if via == "verp" else "fbl@bounces.example.com"
        async with smtpd(services) as server:
            await inject(server.port, rcpt, arf(rcpt, received.data))
        found = await messages.find(services.db, message_id)
        assert found is not None
        assert found["status"] == "delivered"  # it was delivered; then someone complained
        assert [e["type"] for e in found["events"]] == ["queued", "delivered", "complained"]
        assert found["events"][-1]["data"]["feedbackType"] == "abuse"
        async with api(services) as client:
            listed = await client.get("/v1/suppressions", headers=auth)
        assert [(s["emailAddress"], s["reason"]) for s in listed.json()["data"]["list"]] == [
            ("gone@example.net", "complaint")
        ]
        async with workers(services):
            (hook_request,) = await receiver.wait_for(1)
        assert hook_request.signature_ok is True
        assert b'"complained"' in hook_request.body


async def test_only_our_addresses_are_accepted(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    async with opened(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    ) as services:
        message_id, _ = await sent_through_relay(services, smtp_sink)
        async with smtpd(services) as server:
            unknown = f"b+{secrets.token_hex(16)}@bounces.example.com"
            wrong_domain = f"b+{message_id}@bounces.example.org"
            assert (await rcpt_reply(server.port, unknown))[0] == 550
            assert (await rcpt_reply(server.port, wrong_domain))[0] == 550
            for outside in ("someone@example.net", "postmaster@bounces.example.com"):
                code, text = await rcpt_reply(server.port, outside)
                assert (code, b"5.7.1" in text) == (550, True), outside
            assert (await rcpt_reply(server.port, f"b+{message_id}@bounces.example.com"))[0] == 250


def test_parse_report_shapes() -> None:
    original = b"Message-ID: <" + b"a" * 32 + b"@example.com>\r\nSubject: x\r\n\r\nbody\r\n"
    bounce = bounces.parse_report(dsn("b+x@bounces.example.com", original))
    assert bounce.kind == "dsn"
    (status,) = bounce.recipients
    assert (status.action, status.status, status.recipient) == (
        "failed",
        "5.1.1",
        "gone@example.net",
    )
    assert status.smtp_code == 550 and status.hard
    assert bounce.original_ids == ("a" * 32,)
    complaint = bounces.parse_report(arf("fbl@bounces.example.com", original, "fraud"))
    assert (complaint.kind, complaint.feedback_type) == ("arf", "fraud")
    assert complaint.original_ids == ("a" * 32,)
    assert bounces.parse_report(b"Subject: out of office\r\n\r\nback soon\r\n").kind == "other"
    assert bounces.parse_report(b"\xff\xfe garbage").kind == "other"


def test_classify_address() -> None:
    sub = "bounces"
    verp = bounces.classify_address(f"B+{'f' * 32}@Bounces.Example.com", sub)
    assert verp == bounces.Inbound("bounce", "example.com", message_id="f" * 32)
    unsub = bounces.classify_address("unsubscribe+12-abc@bounces.example.com", sub)
    assert unsub is not None and unsub.kind == "unsubscribe" and unsub.token == "12-abc"
    for outside in ("b+x@example.com", f"b+{'f' * 32}@example.com", "x@bounces.example.com"):
        assert bounces.classify_address(outside, sub) is None


async def _auth_for(services: Services, account_id: str) -> dict[str, str]:
    from sendkit import keys

    key = await keys.create(services.db, services.box, account_id, name="bounces-test")
    return {"Authorization": f"Bearer {key.api_key}"}
