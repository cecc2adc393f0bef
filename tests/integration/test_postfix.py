"""A real Postfix between the client and the sink: smtp client -> PostfixInstance -> SmtpSink.

Needs Postfix installed (``.ci/install-postfix.sh``) and root; skipped otherwise, unless
SENDKIT_REQUIRE_SERVICES=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import os
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from sendkit.testing.postfix import PostfixInstance, postfix_available
from sendkit.testing.smtp import ReceivedMessage, SmtpSink

pytestmark = pytest.mark.slow

REQUIRE = os.environ.get("SENDKIT_REQUIRE_SERVICES") == "1"
SENDER = "b+abc@bounces.example.com"
RECIPIENT = "to@example.com"
ARRIVAL_TIMEOUT = 20.0


@pytest.fixture
def postfix_ready() -> None:
    reason = postfix_available()
    if reason is None:
        return
    if REQUIRE:
        pytest.fail(f"{reason} (SENDKIT_REQUIRE_SERVICES=1)")
    pytest.skip(f"{reason}; run .ci/install-postfix.sh as root")


async def wait_for_messages(
    sink: SmtpSink, count: int, mta: PostfixInstance
) -> list[ReceivedMessage]:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while len(sink.messages) < count:
        if time.monotonic() > deadline:
            queue = await asyncio.to_thread(mta.queue_listing)
            pytest.fail(
                f"{len(sink.messages)} of {count} messages reached the sink in "
                f"{ARRIVAL_TIMEOUT}s\n--- queue\n{queue}\n--- maillog\n{mta.maillog()}"
            )
        await asyncio.sleep(0.05)
    return sink.messages


def build_message(body: str) -> bytes:
    """A complete message, Date and Message-ID included, so Postfix has nothing to add but
    its Received: header (it adds missing ones for clients on its own interfaces)."""
    message = EmailMessage()
    message["From"] = "Sender <from@example.com>"
    message["To"] = RECIPIENT
    message["Subject"] = "relayed through a real Postfix"
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = "<postfix-test@sendkit.test>"
    message.set_content(body)
    return message.as_bytes(policy=email.policy.SMTP)


@pytest.mark.usefixtures("postfix_ready")
async def test_postfix_relays_to_the_sink(tmp_path: Path) -> None:
    body = "Hello through Postfix.\n" + "".join(f"line {i:04d} of the body\n" for i in range(200))
    body += ".a line that needs dot-stuffing\n"
    sent = build_message(body)
    async with SmtpSink() as sink, PostfixInstance(tmp_path, next_hop_port=sink.port) as mta:
        assert mta.host == "127.0.0.1"
        # Loopback only: the instance's processes listen on its smtpd port and nothing else.
        assert mta.listening() == [("127.0.0.1", mta.port)]

        errors, reply = await aiosmtplib.send(
            sent,
            hostname=mta.host,
            port=mta.port,
            sender=SENDER,
            recipients=[RECIPIENT],
            start_tls=False,
            use_tls=False,
            timeout=10,
        )
        assert errors == {}
        assert reply.startswith("2.0.0 Ok: queued as ")
        queue_id = reply.rsplit(" ", 1)[1]

        [received] = await wait_for_messages(sink, 1, mta)
        assert received.mail_from == SENDER
        assert received.rcpt_tos == (RECIPIENT,)

        # Byte for byte what the client sent, behind the one Received: header Postfix added.
        assert received.data.endswith(sent)
        added = email.message_from_bytes(received.data[: -len(sent)] + b"\r\n")
        assert added.keys() == ["Received"]
        received_header = added["Received"]
        assert f"by {mta.hostname} (Postfix) with ESMTP id {queue_id}" in received_header
        assert "[127.0.0.1]" in received_header
        assert f"for <{RECIPIENT}>" in received_header
        parsed = email.message_from_bytes(received.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        assert parsed["Message-ID"] == "<postfix-test@sendkit.test>"
        assert parsed.get_content().replace("\r\n", "\n") == body

        await asyncio.to_thread(mta.wait_for_empty_queue, 10)
        log = mta.maillog()
        assert f"{queue_id}: to=<{RECIPIENT}>, relay=127.0.0.1[127.0.0.1]:{sink.port}" in log
        assert "status=sent" in log
        master = mta.master_pid
        assert master is not None
        assert master in mta.processes()

    # Stopped: no process of the instance survives, nothing listens on its port.
    assert not mta.running
    assert mta.processes() == []
    assert mta.listening() == []
    with pytest.raises(ProcessLookupError):
        os.kill(master, 0)  # not even a zombie: the supervisor reaped it


async def test_documented_send_ends_in_postfix_hands_signed(
    postfix_ready: None, tmp_path: Path, database_url: str
) -> None:
    """The issue's 'done when': SENDKIT_DELIVERY=relay pointed at a local Postfix; the
    documented send example passes through Postfix, DKIM-signed so that dkimpy verifies."""
    import dkim as dkimpy
    import httpx

    from tests.live import live_server

    async with SmtpSink() as sink:
        with (
            PostfixInstance(tmp_path / "mta", next_hop_port=sink.port) as mta,
            live_server(
                tmp_path,
                database_url,
                SENDKIT_DELIVERY="relay",
                SENDKIT_RELAY_HOST="127.0.0.1",
                SENDKIT_RELAY_PORT=str(mta.port),
                SENDKIT_POLL_INTERVAL="0.05",
            ) as server,
        ):
            demo = server.cli("init", "--demo")
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                response = await client.post(
                    "/v1/send",
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "Authorization": f"Bearer {demo['apiKey']}",
                    },
                    content=b'{\n    "from": "from@example.com",\n    "to": '
                    b'"to@example.com",\n    "subject": "test send",\n    "body": '
                    b'"test content"\n  }',
                )
            assert response.json()["code"] == 0
            message_id = response.headers["x-message-id"]
            received = (await wait_for_messages(sink, 1, mta))[0]
            records = server.cli(
                "domain", "records", "example.com", "--account", demo["accountId"]
            )["records"]
            deadline = time.monotonic() + 20
            shown = server.cli("messages", "show", message_id)
            while shown["status"] != "delivered" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                shown = server.cli("messages", "show", message_id)
    assert shown["status"] == "delivered"
    assert "250" in str(shown["attempts"][-1]["code"])
    assert received.mail_from == f"b+{message_id}@bounces.example.com"
    assert received.rcpt_tos == ("to@example.com",)
    assert b"Received: from" in received.data  # it really went through Postfix
    dkim_txt = next(r["value"] for r in records if r["purpose"] == "DKIM")
    assert dkimpy.verify(received.data, dnsfunc=lambda name, timeout=5: dkim_txt.encode())
    assert not dkimpy.verify(
        received.data.replace(b"test content", b"test CONTENT"),
        dnsfunc=lambda name, timeout=5: dkim_txt.encode(),
    )
