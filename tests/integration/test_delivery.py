"""Queued messages reach real SMTP servers (or the sandbox), signed, with retries."""

from __future__ import annotations

import asyncio
import email
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim as dkimpy
import httpx
import pytest

from sendkit import domains, messages
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.delivery import queue
from sendkit.delivery.sandbox import raw_message
from sendkit.delivery.worker import Worker, make_transport
from sendkit.services import Services
from sendkit.testing.smtp import Fault, SmtpSink, Stage
from sendkit.web.app import create_app
from tests.conftest import SEND_EXAMPLE, Tenant, make_settings, make_tenant


def dkim_dns(records: list[dict[str, Any]]) -> Callable[..., bytes]:
    txt = {r["name"]: r["value"] for r in records if r["purpose"] == "DKIM"}

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return txt.get(name.decode().rstrip("."), "").encode()

    return lookup


async def records_for(services: Services, tenant: Tenant) -> list[dict[str, Any]]:
    return await domains.dns_records(
        services.db,
        services.box,
        tenant.account_id,
        "example.com",
        mail_host="mx.sendkit.test",
        return_path_subdomain="bounces",
    )


class Harness:
    """A worker running against real services until a condition holds."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.worker = Worker(services, make_transport(services.settings, services.db))
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.worker.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task
        await self.worker.transport.close()

    async def status_of(self, message_id: str) -> dict[str, Any]:
        found = await messages.find(self.services.db, message_id)
        assert found is not None
        return found

    async def wait_for(
        self, message_id: str, *statuses: str, timeout: float = 15
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = await self.status_of(message_id)
            if found["status"] in statuses:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"still {found['status']} after {timeout}s: {found}")
            await asyncio.sleep(0.05)


async def open_services(tmp_path: Path, database_url: str, **overrides: Any) -> Services:
    defaults: dict[str, Any] = {
        "poll_interval": 0.05,
        "retry_schedule": "0.3;give_up=2;jitter=0",
        "smtp_timeout": 3,
        "shutdown_timeout": 5,
        "ehlo_name": "sendkit.test",
    }
    return services_mod.build(make_settings(tmp_path, database_url, **(defaults | overrides)))


async def send(services: Services, tenant: Tenant, **fields: str) -> str:
    app = create_app(services.settings, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1/send", json=SEND_EXAMPLE | fields, headers=tenant.auth)
    assert response.json()["code"] == 0, response.text
    return response.headers["x-message-id"]


async def test_sandbox_keeps_the_signed_message(tmp_path: Path, database_url: str) -> None:
    services = await open_services(tmp_path, database_url)
    try:
        tenant = await make_tenant(services)
        message_id = await send(services, tenant, subject="Grüße", body="<p>Hello <b>you</b></p>")
        async with Harness(services) as h:
            found = await h.wait_for(message_id, "delivered")
        assert found["attempts_log"][0]["code"] == 250
        raw = await raw_message(services.db, message_id)
        assert raw is not None
        parsed = email.message_from_bytes(raw)
        assert parsed["Return-Path"] == f"<b+{message_id}@bounces.example.com>"
        assert parsed["Message-ID"] == f"<{message_id}@example.com>"
        assert parsed.get_content_type() == "multipart/alternative"
        signed = raw.split(b"\r\n", 1)[1]  # the Return-Path line is added on delivery
        assert dkimpy.verify(signed, dnsfunc=dkim_dns(await records_for(services, tenant)))
        assert not dkimpy.verify(
            signed.replace(b"Subject:", b"Subject: X"),
            dnsfunc=dkim_dns(await records_for(services, tenant)),
        )
    finally:
        await services.close()


async def test_relay_delivers_to_smtp_server(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = await open_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    )
    try:
        tenant = await make_tenant(services)
        body = "line one\n.\nline after a lone dot\r\n.\r\nQUIT\n" + "x" * 3000
        ids = [await send(services, tenant, body=body, to=f"r{i}@example.net") for i in range(3)]
        async with Harness(services) as h:
            for message_id in ids:
                found = await h.wait_for(message_id, "delivered")
                assert found["attempts_log"][0]["host"] == smtp_sink.label
        assert len(smtp_sink.messages) == 3  # smuggled dots never make a fourth
        received = smtp_sink.messages[0]
        assert received.mail_from.startswith("b+")
        assert received.mail_from.endswith("@bounces.example.com")
        lookup = dkim_dns(await records_for(services, tenant))
        assert all(dkimpy.verify(m.data, dnsfunc=lookup) for m in smtp_sink.messages)
        text = email.message_from_bytes(received.data).get_payload(decode=True)
        assert b"line after a lone dot" in text
    finally:
        await services.close()


async def test_temporary_failure_is_retried_then_fails(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = await open_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    )
    smtp_sink.fault = Fault.reply(Stage.RCPT, 451, "4.3.0 try later")
    try:
        tenant = await make_tenant(services)
        message_id = await send(services, tenant)
        async with Harness(services) as h:
            deferred = await h.wait_for(message_id, "deferred")
            assert deferred["last_code"] == 451
            assert deferred["next_attempt_at"] > deferred["updated_at"]
            failed = await h.wait_for(message_id, "failed", timeout=20)
        assert len(failed["attempts_log"]) >= 2
        assert {a["outcome"] for a in failed["attempts_log"]} <= {"deferred", "failed"}
        assert smtp_sink.messages == []
    finally:
        await services.close()


async def test_deferred_then_delivered(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = await open_services(
        tmp_path,
        database_url,
        delivery="relay",
        relay_port=smtp_sink.port,
        retry_schedule="0.3;give_up=60;jitter=0",
    )
    smtp_sink.fault = Fault.drop(Stage.DOT)
    try:
        tenant = await make_tenant(services)
        message_id = await send(services, tenant)
        async with Harness(services) as h:
            await h.wait_for(message_id, "deferred")
            smtp_sink.fault = None
            done = await h.wait_for(message_id, "delivered")
        outcomes = [a["outcome"] for a in done["attempts_log"]]
        assert outcomes[0] == "deferred" and outcomes[-1] == "delivered"
    finally:
        await services.close()


async def test_permanent_failure_bounces_and_suppresses(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = await open_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    )
    smtp_sink.fault = Fault.reply(Stage.RCPT, 550, "5.1.1 no such user")
    try:
        tenant = await make_tenant(services)
        first = await send(services, tenant, to="gone@example.net")
        async with Harness(services) as h:
            bounced = await h.wait_for(first, "bounced")
            assert bounced["last_code"] == 550
            assert len(bounced["attempts_log"]) == 1
            smtp_sink.fault = None
            second = await send(services, tenant, to="Gone@Example.net")
            later = await h.status_of(second)
        assert later["status"] == "suppressed"
        assert later["attempts_log"] == []
        assert smtp_sink.messages == []
    finally:
        await services.close()


async def test_lease_fencing_and_reclaim(tmp_path: Path, database_url: str) -> None:
    services = await open_services(tmp_path, database_url, workers=False)
    try:
        tenant = await make_tenant(services)
        message_id = await send(services, tenant)
        first = await queue.claim(services.db, 10, lease_ms=200)
        assert [c.id for c in first] == [message_id]
        assert await queue.claim(services.db, 10, lease_ms=200) == []  # leased
        await asyncio.sleep(0.3)
        second = await queue.claim(services.db, 10, lease_ms=60_000)  # lease ran out
        assert [c.id for c in second] == [message_id]
        stale = queue.Outcome(
            message_id, first[0].lease_token, "delivered", None, 250, "ok", "h", 0, 1
        )
        assert await queue.finish(services.db, [stale]) == []  # the late worker is fenced
        fresh = queue.Outcome(
            message_id, second[0].lease_token, "delivered", None, 250, "ok", "h", 0, 1
        )
        assert await queue.finish(services.db, [fresh]) == [message_id]
        found = await messages.find(services.db, message_id)
        assert found is not None and found["status"] == "delivered"
        assert len(found["attempts_log"]) == 1
    finally:
        await services.close()


async def test_graceful_stop_lets_inflight_finish(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = await open_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port
    )
    smtp_sink.fault = Fault.slow(Stage.DOT, 1.0)
    try:
        tenant = await make_tenant(services)
        message_id = await send(services, tenant)
        h = Harness(services)
        await h.__aenter__()
        deadline = time.monotonic() + 10
        while not smtp_sink.active_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await h.__aexit__()  # SIGTERM's path: stop claiming, finish what is in flight
        found = await h.status_of(message_id)
        assert found["status"] == "delivered"
        assert len(smtp_sink.messages) == 1
    finally:
        await services.close()


def test_settings_accept_delivery_modes(tmp_path: Path) -> None:
    for mode in ("sandbox", "relay", "direct"):
        assert Settings(data_dir=tmp_path, delivery=mode).delivery == mode
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, delivery="carrier-pigeon")
