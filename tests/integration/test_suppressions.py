"""The suppression list through the API: add, list, export, remove; sends to a listed
address are recorded as `suppressed` (with an event and a webhook) and never attempted."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx

from sendkit.testing.smtp import SmtpSink
from tests.conftest import Tenant, assert_envelope
from tests.integration.dashboard_helpers import add_user, log_in, submit
from tests.integration.eventkit import api, opened, send, status_is, tenant_for, workers
from tests.integration.webhook_receiver import WebhookReceiver


async def add(client: httpx.AsyncClient, tenant: Tenant, address: str, **extra: str) -> bool:
    response = await client.post(
        "/v1/suppressions", json={"emailAddress": address, **extra}, headers=tenant.auth
    )
    assert response.json()["code"] == 0, response.text
    return bool(response.json()["data"]["added"])


async def test_manage_the_list(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        other = await tenant_for(services, name="Other")
        assert await add(client, tenant, "Gone@Example.net") is True
        assert await add(client, tenant, "gone@example.net") is False  # idempotent
        assert await add(client, tenant, "=cmd@example.net", reason="complaint") is True

        page = (await client.get("/v1/suppressions", headers=tenant.auth)).json()["data"]
        assert page["total"] == 2
        assert {(s["emailAddress"], s["reason"]) for s in page["list"]} == {
            ("gone@example.net", "manual"),
            ("=cmd@example.net", "complaint"),
        }
        filtered = await client.get(
            "/v1/suppressions", params={"q": "gone", "reason": "manual"}, headers=tenant.auth
        )
        assert [s["emailAddress"] for s in filtered.json()["data"]["list"]] == ["gone@example.net"]
        # Scoped to the account.
        theirs = (await client.get("/v1/suppressions", headers=other.auth)).json()["data"]
        assert theirs["total"] == 0

        export = await client.get("/v1/suppressions/export", headers=tenant.auth)
        assert export.status_code == 200
        assert export.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(export.text)))
        assert rows[0] == ["email", "reason", "created_at"]
        # Sorted by address; a formula-looking cell is defused for spreadsheets.
        assert [r[:2] for r in rows[1:]] == [
            ["'=cmd@example.net", "complaint"],
            ["gone@example.net", "manual"],
        ]

        for bad in ({"emailAddress": "not an address"}, {"emailAddress": "a@b.c", "reason": "x"}):
            response = await client.post("/v1/suppressions", json=bad, headers=tenant.auth)
            assert response.status_code == 400
            assert_envelope(response.json(), 100033)

        gone = await client.request(
            "DELETE",
            "/v1/suppressions",
            params={"emailAddress": "GONE@example.net"},
            headers=tenant.auth,
        )
        assert gone.json()["code"] == 0
        missing = await client.request(
            "DELETE",
            "/v1/suppressions",
            params={"emailAddress": "gone@example.net"},
            headers=tenant.auth,
        )
        assert missing.status_code == 404
        assert_envelope(missing.json(), 100033)
        not_theirs = await client.request(
            "DELETE",
            "/v1/suppressions",
            json={"emailAddress": "=cmd@example.net"},
            headers=other.auth,
        )
        assert not_theirs.status_code == 404


async def test_sends_to_suppressed_addresses_are_recorded_not_attempted(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    async with (
        WebhookReceiver() as receiver,
        opened(tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        hook = await client.post(
            "/v1/webhooks",
            json={"url": receiver.url(), "events": ["suppressed", "delivered"]},
            headers=tenant.auth,
        )
        receiver.secret = hook.json()["data"]["secret"]
        await add(client, tenant, "blocked@example.net")
        blocked = await send(client, tenant, to="Blocked <BLOCKED@example.net>")
        allowed = await send(client, tenant, to="open@example.net")
        async with workers(services):
            await status_is(services, allowed, "delivered")
            found = await status_is(services, blocked, "suppressed")
            hooks = await receiver.wait_for(2)
        assert found["attempts_log"] == []
        assert [e["type"] for e in found["events"]] == ["suppressed"]
        assert found["events"][0]["data"]["reason"] == "suppression list"
        assert [m.rcpt_tos for m in smtp_sink.messages] == [("open@example.net",)]
        assert sorted(r.body.count(b'"suppressed"') > 0 for r in hooks) == [False, True]
        assert all(r.signature_ok for r in hooks)

        # Taken off the list, the address gets mail again.
        await client.request(
            "DELETE",
            "/v1/suppressions",
            params={"emailAddress": "blocked@example.net"},
            headers=tenant.auth,
        )
        again = await send(client, tenant, to="blocked@example.net")
        async with workers(services):
            await status_is(services, again, "delivered")
        assert len(smtp_sink.messages) == 2


async def test_hard_bounce_lands_on_the_list(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    from sendkit.testing.smtp import Fault, Stage

    smtp_sink.fault = Fault.reply(Stage.RCPT, 550, "5.1.1 no such user")
    async with (
        opened(tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        message_id = await send(client, tenant, to="nouser@example.net")
        async with workers(services, webhooks=False):
            found = await status_is(services, message_id, "bounced")
        assert [e["type"] for e in found["events"]] == ["queued", "bounced"]
        assert found["events"][1]["data"]["code"] == 550
        listed = (await client.get("/v1/suppressions", headers=tenant.auth)).json()["data"]
        assert [(s["emailAddress"], s["reason"]) for s in listed["list"]] == [
            ("nouser@example.net", "hard_bounce")
        ]


async def test_dashboard_views_adds_removes_and_exports(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        await add_user(services, tenant.account_id, "owner@example.com")
        await log_in(client, "owner@example.com")
        added = await submit(client, "/suppressions", {"email": "Someone@Example.net"})
        assert added.status_code == 303
        page = await client.get("/suppressions")
        assert "someone@example.net" in page.text and "manual" in page.text
        bad = await submit(client, "/suppressions", {"email": "nope"})
        assert bad.status_code == 400
        export = await client.get("/suppressions/export")
        assert export.text.splitlines()[1].startswith("someone@example.net,manual,")
        removed = await submit(
            client, "/suppressions/remove", {"email": "someone@example.net"}, page="/suppressions"
        )
        assert removed.status_code == 303
        listed = (await client.get("/v1/suppressions", headers=tenant.auth)).json()["data"]
        assert listed["total"] == 0
