"""One-click unsubscribe (RFC 8058): headers on list mail, a GET that only confirms, a POST
that unsubscribes without login, the mailto, forged tokens, and `appId` on send."""

from __future__ import annotations

import asyncio
import email
import json
import re
import smtplib
import time
from pathlib import Path
from typing import Any

import dkim as dkimpy
import httpx
import pytest

from sendkit.delivery.sandbox import raw_message
from sendkit.services import Services
from tests.conftest import Tenant, assert_envelope
from tests.integration.eventkit import (
    api,
    opened,
    send,
    smtpd,
    status_is,
    tenant_for,
    workers,
)
from tests.integration.test_delivery import dkim_dns, records_for
from tests.integration.webhook_receiver import WebhookReceiver
from tests.live import live_server, server_env

_URL = re.compile(r"<(https?://[^>]+/u/([^>]+))>")
_MAILTO = re.compile(r"<mailto:([^?>]+)\?subject=unsubscribe>")


async def add_contact(
    client: httpx.AsyncClient, tenant: Tenant, address: str, status: str = "Confirmed"
) -> None:
    body = {"appId": tenant.app_id, "emailAddress": address, "status": status}
    response = await client.post("/v1/contact", json=body, headers=tenant.auth)
    assert response.json()["code"] == 0, response.text


async def contact_status(client: httpx.AsyncClient, tenant: Tenant, address: str) -> str:
    response = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    found = [c for c in response.json()["data"]["list"] if c["emailAddress"] == address]
    return str(found[0]["status"])


async def delivered_list_mail(
    services: Services, client: httpx.AsyncClient, tenant: Tenant, to: str
) -> tuple[str, email.message.Message, bytes]:
    message_id = await send(client, tenant, to=to, appId=tenant.app_id)
    async with workers(services, webhooks=False):
        await status_is(services, message_id, "delivered")
    raw = await raw_message(services.db, message_id)
    assert raw is not None
    return message_id, email.message_from_bytes(raw), raw


async def test_list_mail_carries_one_click_unsubscribe(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        await add_contact(client, tenant, "reader@example.net")
        _, parsed, raw = await delivered_list_mail(services, client, tenant, "reader@example.net")
        header = parsed["List-Unsubscribe"]
        url, token = _URL.search(header).groups()  # type: ignore[union-attr]
        assert url == f"https://mail.sendkit.test/u/{token}"
        mailto = _MAILTO.search(header)[1]  # type: ignore[index]
        assert mailto == f"unsubscribe+{token}@bounces.example.com"
        assert len(mailto.partition("@")[0]) <= 64
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        # Both headers are covered by the DKIM signature.
        signed = raw.split(b"\r\n", 1)[1]
        assert dkimpy.verify(signed, dnsfunc=dkim_dns(await records_for(services, tenant)))
        h_tag = parsed["DKIM-Signature"].replace("\r\n", "").replace(" ", "").lower()
        assert "list-unsubscribe:list-unsubscribe-post" in h_tag

        # A GET (a link scanner, a preview) shows a page and changes nothing.
        page = await client.get(f"/u/{token}")
        assert page.status_code == 200
        assert 'method="post"' in page.text
        assert page.headers["cache-control"] == "no-store"
        assert await contact_status(client, tenant, "reader@example.net") == "Confirmed"

        # The one-click POST, with no cookie and no login.
        client.cookies.clear()
        done = await client.post(
            f"/u/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert done.status_code == 200
        assert await contact_status(client, tenant, "reader@example.net") == "Unsubscribed"
        again = await client.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click")
        assert again.status_code == 200

        events = (await client.get("/v1/events", headers=tenant.auth)).json()["data"]["list"]
        unsubscribed = [e for e in events if e["type"] == "unsubscribed"]
        assert len(unsubscribed) == 1  # the repeated POST recorded nothing
        assert unsubscribed[0]["data"] == {
            "email": "reader@example.net",
            "appId": tenant.app_id,
            "via": "one-click",
        }
        # List mail to the unsubscribed contact is recorded, never attempted.
        later = await send(client, tenant, to="reader@example.net", appId=tenant.app_id)
        found = await status_is(services, later, "suppressed")
        assert [e["type"] for e in found["events"]] == ["suppressed"]
        assert found["events"][0]["data"]["reason"] == "unsubscribed"


async def test_mail_without_a_list_has_no_unsubscribe_header(
    tmp_path: Path, database_url: str
) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        plain = await send(client, tenant, to="someone@example.net")
        async with workers(services, webhooks=False):
            await status_is(services, plain, "delivered")
        # With appId, but the recipient is not a contact of the app.
        _, stranger, _ = await delivered_list_mail(services, client, tenant, "nobody@example.net")
        raw = await raw_message(services.db, plain)
        assert raw is not None
        assert email.message_from_bytes(raw)["List-Unsubscribe"] is None
        assert stranger["List-Unsubscribe"] is None


async def test_forged_and_tampered_tokens_answer_404(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        await add_contact(client, tenant, "a@example.net")
        await add_contact(client, tenant, "b@example.net")
        _, parsed, _ = await delivered_list_mail(services, client, tenant, "a@example.net")
        token = _URL.search(parsed["List-Unsubscribe"])[2]  # type: ignore[index]
        contact_id, mac = token.split("-")
        flipped = mac[:-1] + ("a" if mac[-1] != "a" else "b")
        forged = [
            f"{contact_id}-{flipped}",  # tampered HMAC
            f"{int(contact_id) + 1}-{mac}",  # moved to another contact
            f"{int(contact_id) + 1000}-{mac}",  # a contact that does not exist
            f"{contact_id}-{'a' * 26}",
            "garbage",
            f"{contact_id}-{mac}x",
        ]
        for bad in forged:
            for method in ("GET", "POST"):
                response = await client.request(method, f"/u/{bad}", content=b"")
                assert response.status_code == 404, (method, bad)
        assert await contact_status(client, tenant, "a@example.net") == "Confirmed"
        assert await contact_status(client, tenant, "b@example.net") == "Confirmed"
        assert (await client.get(f"/u/{token}")).status_code == 200


async def test_send_validates_app_id(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        other = await tenant_for(services, name="Other")
        for app_id in ("999", other.app_id):
            body = {
                "from": "from@example.com",
                "to": "to@example.com",
                "subject": "s",
                "body": "b",
                "appId": app_id,
            }
            response = await client.post("/v1/send", json=body, headers=tenant.auth)
            assert response.status_code == 404
            assert_envelope(response.json(), 100033)
        numeric = await send(client, tenant, appId=int(tenant.app_id))
        assert numeric


async def test_mailto_unsubscribe_through_smtpd(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        await add_contact(client, tenant, "mailer@example.net")
        _, parsed, _ = await delivered_list_mail(services, client, tenant, "mailer@example.net")
        mailto = _MAILTO.search(parsed["List-Unsubscribe"])[1]  # type: ignore[index]
        async with smtpd(services) as server:

            def mail() -> None:
                with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
                    smtp.sendmail(
                        "mailer@example.net",
                        [mailto],
                        b"From: mailer@example.net\r\nSubject: unsubscribe\r\n\r\nplease\r\n",
                    )

            await asyncio.to_thread(mail)
        assert await contact_status(client, tenant, "mailer@example.net") == "Unsubscribed"


@pytest.mark.slow
async def test_one_click_against_sendkit_serve(tmp_path: Path, database_url: str) -> None:
    """The whole path through a real `sendkit serve` (uvicorn, its own workers): send list
    mail, take the URL from the delivered message, POST it, read `Unsubscribed` back from
    GET /v1/contact, and receive the signed `unsubscribed` webhook."""
    env = {"SENDKIT_WEBHOOK_ALLOW_CIDRS": "127.0.0.0/8", "SENDKIT_POLL_INTERVAL": "0.1"}
    # The live server's secret key: it decrypts the DKIM key this process stores.
    async with (
        WebhookReceiver() as receiver,
        opened(tmp_path, database_url, secret_key=server_env("")["SENDKIT_SECRET_KEY"]) as services,
    ):
        tenant = await tenant_for(services)
        with live_server(tmp_path, database_url, **env) as server:
            async with httpx.AsyncClient(
                base_url=server.base_url, headers=tenant.auth, timeout=10
            ) as http:
                hook = await http.post("/v1/webhooks", json={"url": receiver.url()})
                receiver.secret = hook.json()["data"]["secret"]
                await add_contact(http, tenant, "live@example.net")
                message_id = await send(http, tenant, to="live@example.net", appId=tenant.app_id)
                await status_is(services, message_id, "delivered")
                raw = await raw_message(services.db, message_id)
                assert raw is not None
                url = _URL.search(email.message_from_bytes(raw)["List-Unsubscribe"])[1]  # type: ignore[index]
                assert url.startswith(server.base_url + "/u/")
                async with httpx.AsyncClient(timeout=10) as anonymous:  # no key, no cookie
                    assert (await anonymous.get(url)).status_code == 200
                    response = await anonymous.post(
                        url,
                        content=b"List-Unsubscribe=One-Click",
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                    )
                assert response.status_code == 200
                assert await contact_status(http, tenant, "live@example.net") == "Unsubscribed"
                await _hook_arrived(receiver, "unsubscribed")
                # The in-process workers of `sendkit serve` report to the app's /metrics.
                metrics = (await http.get("/metrics")).text
                assert 'sendkit_deliveries_total{outcome="delivered"} 1.0' in metrics
        assert {"queued", "delivered", "unsubscribed"} <= {_type(r.body) for r in receiver.received}
        assert all(r.signature_ok for r in receiver.received)


def _type(body: bytes) -> Any:
    return json.loads(body)["type"]


async def _hook_arrived(receiver: WebhookReceiver, kind: str) -> None:
    deadline = time.monotonic() + 20
    while kind not in [_type(r.body) for r in receiver.received]:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {kind} webhook arrived")
        await asyncio.sleep(0.05)
