"""SMTP submission against a real `sendkit smtpd` (in-process, and once as the CLI):
AUTH with an API key, the same checks and codes as `POST /v1/send` as SMTP replies,
STARTTLS, smuggling payloads, pipelining after STARTTLS, and no open relay."""

from __future__ import annotations

import asyncio
import base64
import email.policy
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
import trustme

from sendkit import accounts, keys, messages
from sendkit.db import messages as messages_table
from sendkit.services import Services
from tests.conftest import Tenant, free_port
from tests.integration.eventkit import opened, smtpd, status_is, tenant_for, workers

T = TypeVar("T")


def mime(
    sender: str = "Sender <from@example.com>",
    to: str = "Reader <reader@example.net>",
    subject: str = "Grüße aus SMTP",
    body: str = "Hello over SMTP.\n",
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    return message


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def smtp_error(fn: Callable[[], Any]) -> tuple[int, str]:
    """The (code, text) an SMTP exception carries, for asserting on refusals."""
    try:
        fn()
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text.decode()
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode()
    raise AssertionError("the server accepted what it should have refused")


async def queued_for(services: Services, account_id: str) -> list[Any]:
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(messages_table).where(messages_table.c.account_id == account_id)
        )
        return list(rows)


async def test_submission_with_plain_and_login(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, smtpd(services) as server:
        tenant = await tenant_for(services)

        def submit(mechanism: str) -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
                smtp.ehlo()
                assert "PLAIN" in smtp.esmtp_features["auth"]
                smtp.user, smtp.password = "apikey", tenant.token
                code, _ = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
                assert code == 235
                return smtp.send_message(mime(subject=f"via {mechanism}"))  # type: ignore[no-any-return]

        assert await in_thread(lambda: submit("PLAIN")) == {}
        assert await in_thread(lambda: submit("LOGIN")) == {}
        rows = await queued_for(services, tenant.account_id)
        assert sorted(r.subject for r in rows) == ["via LOGIN", "via PLAIN"]
        row = rows[0]
        assert row.from_header == '"Sender" <from@example.com>'
        assert row.to_header == '"Reader" <reader@example.net>'
        assert row.body == "Hello over SMTP.\n"
        async with workers(services, webhooks=False):
            found = await status_is(services, row.id, "delivered")
        assert [e["type"] for e in found["events"]] == ["queued", "delivered"]


async def test_refusals_map_to_smtp_replies(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, smtpd(services) as server:
        tenant = await tenant_for(services, sender="news")
        inactive = await tenant_for(services, name="Inactive", active=False, domain="idle.com")
        unverified = await tenant_for(services, name="Unverified", domain="new.com", verified=False)
        signed_only = await keys.create(
            services.db, services.box, tenant.account_id, require_signature=True
        )
        revoked = await keys.create(services.db, services.box, tenant.account_id)
        await keys.revoke(services.db, revoked.prefix)

        def session(token: str) -> smtplib.SMTP:
            smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
            smtp.login("apikey", token)
            return smtp

        def auth_fails(token: str) -> tuple[int, str]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
                return smtp_error(lambda: smtp.login("apikey", token))

        for token in ("sk_not-a-key", revoked.api_key, "nonsense"):
            assert (await in_thread(lambda t=token: auth_fails(t)))[0] == 535  # type: ignore[misc]
        code, text = await in_thread(lambda: auth_fails(signed_only.api_key))
        assert code == 535 and "signed" in text

        def send(token: str, message: EmailMessage, **options: Any) -> tuple[int, str]:
            with session(token) as smtp:
                return smtp_error(lambda: smtp.send_message(message, **options))

        cases: list[tuple[str, EmailMessage, int, str]] = [
            (inactive.token, mime(sender="a@idle.com"), 550, "5.7.1"),
            (unverified.token, mime(sender="a@new.com"), 553, "5.7.1"),  # unverified domain
            (tenant.token, mime(sender="someone@example.com"), 553, "5.7.1"),  # unknown sender
            (tenant.token, mime(sender="x@elsewhere.com"), 553, "5.7.1"),  # not its domain
            (tenant.token, mime(sender="news@example.com", subject=""), 550, "5.6.0"),
        ]
        for token, message, want, enhanced in cases:
            code, text = await in_thread(lambda t=token, m=message: send(t, m))  # type: ignore[misc]
            assert (code, text.split(" ")[0]) == (want, enhanced), (message["From"], text)

        # The envelope sender is fine, the From header is not: refused after DATA.
        header_only = mime(sender="someone@example.com")
        code, _ = await in_thread(
            lambda: send(tenant.token, header_only, from_addr="news@example.com")
        )
        assert code == 553

        with_file = mime(sender="news@example.com")
        with_file.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="a.pdf")
        code, text = await in_thread(lambda: send(tenant.token, with_file))
        assert code == 550 and "attachments" in text

        # Limits: too large (announced with SIZE, or not), daily limit, one recipient.
        await accounts.set_plan(services.db, tenant.account_id, max_size=2000, daily=1)
        big = mime(sender="news@example.com", body=("x" * 70 + "\n") * 80)
        assert (await in_thread(lambda: send(tenant.token, big)))[0] == 552

        def unannounced() -> tuple[int, bytes]:
            with session(tenant.token) as smtp:
                assert smtp.mail("news@example.com")[0] == 250
                assert smtp.rcpt("to@example.net")[0] == 250
                return smtp.data(big.as_bytes(policy=email.policy.SMTP))

        assert (await in_thread(unannounced))[0] == 552

        def two_recipients() -> tuple[int, bytes]:
            with session(tenant.token) as smtp:
                smtp.mail("news@example.com")
                assert smtp.rcpt("one@example.net")[0] == 250
                return smtp.rcpt("two@example.net")

        assert (await in_thread(two_recipients))[0] == 452
        ok = mime(sender="news@example.com")

        def accepted() -> dict[str, Any]:
            with session(tenant.token) as smtp:
                return smtp.send_message(ok)  # type: ignore[no-any-return]

        assert await in_thread(accepted) == {}
        code, text = await in_thread(lambda: send(tenant.token, mime(sender="news@example.com")))
        assert (code, text.split(" ")[0]) == (452, "4.5.3")  # the daily limit, like 100031


async def test_never_an_open_relay(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, smtpd(services) as server:
        tenant = await tenant_for(services)

        def unauthenticated() -> tuple[int, str]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
                return smtp_error(
                    lambda: smtp.sendmail("from@example.com", ["victim@example.net"], b"Hi")
                )

        code, text = await in_thread(unauthenticated)
        assert code == 550 and text.startswith("5.7.1")
        assert await queued_for(services, tenant.account_id) == []


class Raw:
    """A line-level SMTP client on a plain socket, for what smtplib would tidy up."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.reply()  # the greeting

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


async def test_smuggling_payloads_make_no_extra_message(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, smtpd(services) as server:
        tenant = await tenant_for(services)
        auth = base64.b64encode(b"\0apikey\0" + tenant.token.encode()).decode()

        def smuggle() -> list[str]:
            raw = Raw(server.port)
            try:
                assert raw.command("EHLO client.test").startswith("250")
                assert raw.command(f"AUTH PLAIN {auth}").startswith("235")
                assert raw.command("MAIL FROM:<from@example.com>").startswith("250")
                assert raw.command("RCPT TO:<to@example.net>").startswith("250")
                assert raw.command("DATA").startswith("354")
                # Each fake end of data is followed by a whole second transaction; a server
                # that took any of them for the end would queue a second message.
                evil = (
                    b"MAIL FROM:<from@example.com>\r\nRCPT TO:<victim@example.net>\r\n"
                    b"DATA\r\nFrom: from@example.com\r\nSubject: smuggled\r\n\r\nevil"
                )
                payload = b"From: from@example.com\r\nTo: to@example.net\r\nSubject: one\r\n\r\n"
                for fake_end in (b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"):
                    payload += b"text" + fake_end + evil + fake_end
                assert b"\r\n.\r\n" not in payload
                raw.send(payload + b"last line\r\n.\r\n")
                replies = [raw.reply()]
                replies.append(raw.command("QUIT"))
                return replies
            finally:
                raw.close()

        replies = await in_thread(smuggle)
        assert replies[0].startswith("250 2.0.0 OK queued as")
        assert replies[1].startswith("221")
        rows = await queued_for(services, tenant.account_id)
        assert len(rows) == 1  # exactly one message: nothing smuggled in
        assert rows[0].subject == "one"
        assert "RCPT TO:<victim@example.net>" in rows[0].body


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "smtpd.crt", tmp_path / "smtpd.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return ca, cert_path, key_path


async def test_starttls_then_auth(
    tmp_path: Path, database_url: str, certificate: tuple[trustme.CA, Path, Path]
) -> None:
    ca, cert_path, key_path = certificate
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        opened(
            tmp_path, database_url, smtpd_tls_cert=cert_path, smtpd_tls_key=key_path
        ) as services,
        smtpd(services) as server,
    ):
        tenant = await tenant_for(services)

        def converse() -> tuple[bool, int, dict[str, Any]]:
            with smtplib.SMTP("localhost", server.port, timeout=10) as smtp:
                smtp.ehlo()
                offered_before = smtp.has_extn("auth")
                code, _ = smtp.docmd("AUTH", "PLAIN AGFwaWtleQBzaw==")
                smtp.starttls(context=client_context)
                smtp.ehlo()
                smtp.login("apikey", tenant.token)
                return offered_before, code, smtp.send_message(mime())

        offered_before, code_before, refused = await in_thread(converse)
        assert offered_before is False  # AUTH is offered only inside TLS
        assert code_before == 538
        assert refused == {}
        assert len(await queued_for(services, tenant.account_id)) == 1


async def test_starttls_discards_pipelined_plaintext(
    tmp_path: Path, database_url: str, certificate: tuple[trustme.CA, Path, Path]
) -> None:
    ca, cert_path, key_path = certificate
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        opened(
            tmp_path, database_url, smtpd_tls_cert=cert_path, smtpd_tls_key=key_path
        ) as services,
        smtpd(services) as server,
    ):

        def inject() -> list[str]:
            raw = Raw(server.port)
            try:
                assert raw.command("EHLO client.test").startswith("250")
                # An attacker in the middle appends a command after STARTTLS in plaintext.
                raw.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
                assert raw.reply().startswith("220")
                assert raw.buffer == b""  # no reply to the injected command
                raw.sock = client_context.wrap_socket(raw.sock, server_hostname="localhost")
                return [raw.command("EHLO client.test"), raw.command("RCPT TO:<to@example.net>")]
            finally:
                raw.close()

        ehlo, rcpt = await in_thread(inject)
        assert ehlo.startswith("250")
        assert rcpt.startswith("503")  # the injected MAIL FROM was thrown away


@pytest.mark.slow
async def test_sendkit_smtpd_command(tmp_path: Path, database_url: str) -> None:
    """`sendkit smtpd --host --port --data-dir` as a process, driven by smtplib."""
    async with opened(tmp_path, database_url) as services:
        tenant: Tenant = await tenant_for(services)
        port = free_port()
        env = dict(os.environ, SENDKIT_DATABASE_URL=database_url, SENDKIT_SECRET_KEY="smtpd")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sendkit",
                "smtpd",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "smtpd"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            await in_thread(lambda: _wait_for_port(port, proc))

            def submit() -> dict[str, Any]:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.login("apikey", tenant.token)
                    return smtp.send_message(mime(subject="from the CLI"))  # type: ignore[no-any-return]

            assert await in_thread(submit) == {}
        finally:
            proc.terminate()
            _, stderr = await in_thread(lambda: proc.communicate(timeout=15))
        assert proc.returncode == 0, stderr.decode()
        (row,) = await queued_for(services, tenant.account_id)
        assert row.subject == "from the CLI"
        found = await messages.find(services.db, row.id)
        assert found is not None and found["events"][0]["type"] == "queued"


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sendkit smtpd exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("sendkit smtpd did not start within 30 s")
