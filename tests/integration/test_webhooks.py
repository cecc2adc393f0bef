"""Signed webhooks to a real HTTP receiver: retries, 410, redirects, timeouts, replays,
and internal addresses refused when saved and when delivered. Both databases."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from sendkit import webhooks
from tests.conftest import Tenant, assert_envelope
from tests.integration.dashboard_helpers import add_user, log_in, submit
from tests.integration.eventkit import api, eventually, opened, send, tenant_for, workers
from tests.integration.webhook_receiver import Reply, WebhookReceiver


async def create_endpoint(
    client: httpx.AsyncClient, tenant: Tenant, url: str, events: Any = "*"
) -> dict[str, Any]:
    response = await client.post(
        "/v1/webhooks", json={"url": url, "events": events}, headers=tenant.auth
    )
    payload = response.json()
    assert payload["code"] == 0, payload
    return payload["data"]  # type: ignore[no-any-return]


async def deliveries(client: httpx.AsyncClient, tenant: Tenant, endpoint_id: str) -> list[Any]:
    response = await client.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=tenant.auth)
    return response.json()["data"]["list"]  # type: ignore[no-any-return]


async def settled(
    client: httpx.AsyncClient, tenant: Tenant, endpoint_id: str, count: int = 1
) -> list[Any]:
    async def check() -> list[Any] | None:
        found = await deliveries(client, tenant, endpoint_id)
        done = [d for d in found if d["status"] in ("delivered", "failed")]
        return found if len(done) >= count else None

    return await eventually(check, what="webhook deliveries settled")


async def test_signed_post_is_retried_after_500_then_delivered(
    tmp_path: Path, database_url: str
) -> None:
    async with (
        WebhookReceiver([Reply(500, b"boom")], default=Reply(200)) as receiver,
        opened(tmp_path, database_url) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        endpoint = await create_endpoint(client, tenant, receiver.url(), ["delivered"])
        assert endpoint["secret"].startswith("whsec_")
        assert endpoint["events"] == ["delivered"]
        receiver.secret = endpoint["secret"]
        message_id = await send(client, tenant)
        async with workers(services):
            got = await receiver.wait_for(2)
            found = await settled(client, tenant, endpoint["id"])
        first, second = got
        # Both attempts carry a valid signature over the same id and body.
        assert first.signature_ok is True and second.signature_ok is True
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert first.body == second.body
        assert first.headers["webhook-signature"].startswith("v1,")
        body = json.loads(second.body)
        assert body["type"] == "delivered"
        assert body["data"]["messageId"] == message_id
        assert body["data"]["email"] == "to@example.com"
        assert body["timestamp"].endswith("Z")
        # Only the subscribed type was sent (the `queued` event was not).
        assert len(receiver.received) == 2
        (delivery,) = found
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2
        assert [a["statusCode"] for a in delivery["attemptLog"]] == [500, 200]
        assert delivery["attemptLog"][0]["response"] == "boom"


async def test_signature_is_standard_webhooks() -> None:
    secret = webhooks.new_secret()
    body = b'{"type":"delivered"}'
    headers = webhooks.signed_headers(secret, "evt_1", body, timestamp=1_700_000_000)
    moment = dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    assert Webhook(secret).sign("evt_1", moment, body.decode()) == headers["webhook-signature"]


@pytest.mark.parametrize(
    ("reply", "status", "enabled", "requests"),
    [
        (Reply(410), "failed", False, 1),
        (Reply(302, headers={"Location": "/elsewhere"}), "failed", True, 1),
        (Reply(400), "failed", True, 1),
    ],
    ids=["410-disables", "redirect-not-followed", "4xx-not-retried"],
)
async def test_final_answers(
    tmp_path: Path,
    database_url: str,
    reply: Reply,
    status: str,
    enabled: bool,
    requests: int,
) -> None:
    async with (
        WebhookReceiver(default=reply) as receiver,
        opened(tmp_path, database_url) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        endpoint = await create_endpoint(client, tenant, receiver.url(), "queued")
        await send(client, tenant)
        async with workers(services):
            (delivery,) = await settled(client, tenant, endpoint["id"])
        assert delivery["status"] == status
        assert delivery["lastStatusCode"] == reply.status
        assert len(receiver.received) == requests
        assert all(r.path == "/hook" for r in receiver.received)  # never followed
        current = (await client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.auth)).json()
        assert current["data"]["enabled"] is enabled
        if not enabled:
            assert current["data"]["disabledReason"].startswith("410 Gone")


async def test_timeout_and_429_are_retried(tmp_path: Path, database_url: str) -> None:
    script = [Reply(200, delay=1.5), Reply(429)]
    async with (
        WebhookReceiver(script, default=Reply(204)) as receiver,
        opened(tmp_path, database_url, webhook_timeout=0.5) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        endpoint = await create_endpoint(client, tenant, receiver.url(), "queued")
        await send(client, tenant)
        async with workers(services):
            (delivery,) = await settled(client, tenant, endpoint["id"])
        assert delivery["status"] == "delivered"
        log = delivery["attemptLog"]
        assert [a["statusCode"] for a in log] == [None, 429, 204]
        assert "timeout" in log[0]["error"]


INTERNAL_URLS = [
    "http://127.0.0.1:9/hook",
    "http://localhost/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/",
    "http://192.168.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0/",
    "ftp://example.com/",
    "http://exa mple.com/",
]


async def test_internal_urls_are_refused_when_saved(tmp_path: Path, database_url: str) -> None:
    async with (
        opened(tmp_path, database_url, webhook_allow_cidrs="") as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        for url in INTERNAL_URLS:
            response = await client.post("/v1/webhooks", json={"url": url}, headers=tenant.auth)
            assert response.status_code == 400, url
            assert_envelope(response.json(), 100033)
            assert "'url'" in response.json()["message"]
        assert await webhooks.list_endpoints(services.db, tenant.account_id) == []


async def test_internal_address_is_refused_when_delivered(
    tmp_path: Path, database_url: str
) -> None:
    """Saved while the operator allowed loopback; delivered after that was taken back (as a
    DNS answer that changed to an internal address would be): refused at connect time."""
    async with WebhookReceiver() as receiver:
        async with opened(tmp_path, database_url) as services, api(services) as client:
            tenant = await tenant_for(services)
            endpoint = await create_endpoint(client, tenant, receiver.url(), "queued")
            await send(client, tenant)
        async with (
            opened(tmp_path, database_url, webhook_allow_cidrs="") as strict,
            api(strict) as client,
            workers(strict),
        ):
            (delivery,) = await settled(client, tenant, endpoint["id"])
        assert delivery["status"] == "failed"
        assert delivery["attempts"] == 1  # not retried
        assert delivery["lastError"].startswith("blocked:")
        assert receiver.received == []


async def test_replay_sends_the_same_event_again(tmp_path: Path, database_url: str) -> None:
    async with (
        WebhookReceiver() as receiver,
        opened(tmp_path, database_url) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        endpoint = await create_endpoint(client, tenant, receiver.url(), "queued")
        receiver.secret = endpoint["secret"]
        await send(client, tenant)
        async with workers(services):
            (first,) = await settled(client, tenant, endpoint["id"])
            url = f"/v1/webhooks/{endpoint['id']}/replay/{first['id']}"
            replayed = (await client.post(url, headers=tenant.auth)).json()
            assert replayed["code"] == 0
            found = await settled(client, tenant, endpoint["id"], count=2)
        assert {d["id"] for d in found} == {first["id"], replayed["data"]["deliveryId"]}
        one, two = receiver.received
        assert one.headers["webhook-id"] == two.headers["webhook-id"] == first["webhookId"]
        assert one.body == two.body
        assert two.signature_ok is True
        detail = await client.get(
            f"/v1/webhooks/{endpoint['id']}/deliveries/{first['id']}", headers=tenant.auth
        )
        assert json.loads(detail.json()["data"]["payload"])["type"] == "queued"


async def test_endpoints_crud_and_isolation(tmp_path: Path, database_url: str) -> None:
    async with (
        WebhookReceiver() as receiver,
        opened(tmp_path, database_url) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        other = await tenant_for(services, name="Other")
        endpoint = await create_endpoint(client, tenant, receiver.url(), "bounced,complained")
        assert endpoint["events"] == ["bounced", "complained"]
        listed = (await client.get("/v1/webhooks", headers=tenant.auth)).json()["data"]["list"]
        assert [e["id"] for e in listed] == [endpoint["id"]]
        assert "secret" not in listed[0]
        path = f"/v1/webhooks/{endpoint['id']}"
        # Another account's endpoint answers like a missing one.
        for method in ("GET", "PATCH", "DELETE"):
            response = await client.request(method, path, json={}, headers=other.auth)
            assert response.status_code == 404, method
            assert_envelope(response.json(), 100033)
        assert (await client.get("/v1/webhooks", headers=other.auth)).json()["data"]["list"] == []
        bad = await client.post(
            "/v1/webhooks", json={"url": receiver.url(), "events": ["opened"]}, headers=tenant.auth
        )
        assert bad.status_code == 400
        patched = await client.patch(path, json={"enabled": False}, headers=tenant.auth)
        assert patched.json()["data"]["enabled"] is False
        rotated = await client.post(f"{path}/secret", headers=tenant.auth)
        assert rotated.json()["data"]["secret"].startswith("whsec_")
        assert (await client.delete(path, headers=tenant.auth)).json()["code"] == 0
        assert (await client.get(path, headers=tenant.auth)).status_code == 404


async def test_disabled_endpoint_gets_no_deliveries(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        endpoint = await create_endpoint(client, tenant, "http://127.0.0.1:9/x")
        await client.patch(
            f"/v1/webhooks/{endpoint['id']}", json={"enabled": False}, headers=tenant.auth
        )
        await send(client, tenant)
        assert await deliveries(client, tenant, endpoint["id"]) == []


def test_classify() -> None:
    def verdict(code: int | None, blocked: bool = False) -> str:
        attempt = webhooks.Attempt(0, 1, status_code=code, blocked=blocked)
        return webhooks.classify(attempt).value

    assert [verdict(c) for c in (200, 204, 301, 400, 404, 410, 429, 500, 503, None)] == [
        "delivered",
        "delivered",
        "failed",
        "failed",
        "failed",
        "gone",
        "retry",
        "retry",
        "retry",
        "retry",
    ]
    assert verdict(None, blocked=True) == "failed"


async def test_dashboard_manages_endpoints_and_replays(tmp_path: Path, database_url: str) -> None:
    async with (
        WebhookReceiver() as receiver,
        opened(tmp_path, database_url) as services,
        api(services) as client,
    ):
        tenant = await tenant_for(services)
        await add_user(services, tenant.account_id, "owner@example.com")
        await log_in(client, "owner@example.com")
        page = await submit(client, "/webhooks", {"url": receiver.url(), "events": ["queued"]})
        assert page.status_code == 200
        secret = re.search(r'value="(whsec_[^"]+)"', page.text)
        assert secret is not None
        receiver.secret = secret[1]
        (endpoint,) = await webhooks.list_endpoints(services.db, tenant.account_id)
        assert endpoint["events"] == ["queued"]
        refused = await submit(client, "/webhooks", {"url": "http://10.0.0.1/x"}, page="/webhooks")
        assert refused.status_code == 400 and "internal address" in refused.text

        await send(client, tenant)
        async with workers(services):
            (delivery,) = await settled(client, tenant, endpoint["id"])
            detail = await client.get(f"/webhooks/{endpoint['id']}")
            assert delivery["webhookId"] in detail.text and "<strong>200</strong>" in detail.text
            replay = await submit(
                client,
                f"/webhooks/{endpoint['id']}/replay/{delivery['id']}",
                page=f"/webhooks/{endpoint['id']}",
            )
            assert replay.status_code == 303
            await receiver.wait_for(2)
        assert all(r.signature_ok for r in receiver.received)
        toggled = await submit(
            client,
            f"/webhooks/{endpoint['id']}/enabled",
            {"enabled": "0"},
            page=f"/webhooks/{endpoint['id']}",
        )
        assert toggled.status_code == 303
        assert (await webhooks.get_endpoint(services.db, tenant.account_id, endpoint["id"]))[
            "enabled"
        ] is False
