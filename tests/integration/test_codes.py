"""Every documented response code, reached through its real cause, and the order of checks.

The documented order (first failure wins):
  1. 100029 bad/missing/revoked key or signature   6. 100023 message too large
  2. 100049 account not activated                   7. 100030 from-domain not verified
  3. 100047 subscription expired                    8. 100048 sender not registered
  4. 100025 rate limited                            9. 100031 daily limit reached
  5. 100033 bad parameters
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from sendkit import accounts, domains, keys, logs, messages
from sendkit.services import Services
from tests.conftest import SEND_EXAMPLE, Tenant, assert_envelope, make_tenant

RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def expect(response: httpx.Response, status: int, code: int) -> dict[str, Any]:
    """The envelope is right, and `X-Request-Id` is the body's requestId."""
    assert response.status_code == status, response.text
    payload: dict[str, Any] = response.json()
    assert_envelope(payload, code)
    assert response.headers["x-request-id"] == payload["requestId"]
    assert response.headers["content-type"].startswith("application/json")
    return payload


def has_rate_headers(response: httpx.Response) -> bool:
    return all(h in response.headers for h in RATE_HEADERS)


def yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def send_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {**SEND_EXAMPLE, **changes}
    return {k: v for k, v in payload.items() if v is not None}


async def send(
    client: httpx.AsyncClient, tenant: Tenant, payload: dict[str, Any] | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/send", json=SEND_EXAMPLE if payload is None else payload, headers=tenant.auth
    )


def contact(tenant: Tenant, email: str = "john.doe@example.com") -> dict[str, Any]:
    return {"appId": tenant.app_id, "emailAddress": email, "status": "Confirmed"}


async def every_endpoint(client: httpx.AsyncClient, tenant: Tenant) -> list[httpx.Response]:
    """One valid call to each documented endpoint."""
    return [
        await send(client, tenant),
        await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth),
        await client.post("/v1/contact", json=contact(tenant), headers=tenant.auth),
        await client.delete(
            "/v1/contact",
            params={"appId": tenant.app_id, "emailAddress": "john.doe@example.com"},
            headers=tenant.auth,
        ),
    ]


async def roomy_tenant(services: Services, **kwargs: Any) -> Tenant:
    """A tenant whose rate limit does not get in the way of a test making many calls."""
    tenant = await make_tenant(services, **kwargs)
    await accounts.set_plan(services.db, tenant.account_id, rate=1000)
    return tenant


# --- 0: success -------------------------------------------------------------------------


async def test_every_endpoint_succeeds_for_a_good_tenant(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    responses = await every_endpoint(client, tenant)
    ids = set()
    for response in responses:
        payload = expect(response, 200, 0)
        assert payload["message"] == "Successfully"
        assert has_rate_headers(response)
        ids.add(payload["requestId"])
    assert len(ids) == len(responses)


# --- 1: 100029 --------------------------------------------------------------------------


async def test_bad_authorization_headers_are_100029(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    basic = base64.b64encode(b"user:password").decode()
    cases: dict[str, dict[str, str]] = {
        "missing": {},
        "empty bearer": {"Authorization": "Bearer "},
        "bearer without token": {"Authorization": "Bearer"},
        "garbage token": {"Authorization": "Bearer garbage"},
        "unknown sk_ token": {"Authorization": "Bearer sk_" + secrets.token_urlsafe(32)},
        "overlong token": {"Authorization": "Bearer sk_" + "a" * 300},
        "token with a character changed": {
            "Authorization": "Bearer "
            + tenant.token[:-1]
            + ("A" if tenant.token[-1] != "A" else "B")
        },
        "basic auth": {"Authorization": f"Basic {basic}"},
        "real token under basic": {"Authorization": f"Basic {tenant.token}"},
        "real token under another scheme": {"Authorization": f"Token {tenant.token}"},
        "real token without a scheme": {"Authorization": tenant.token},
    }
    for name, headers in cases.items():
        for response in (
            await client.post("/v1/send", json=SEND_EXAMPLE, headers=headers),
            await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=headers),
            await client.delete("/v1/contact", params={"appId": tenant.app_id}, headers=headers),
        ):
            assert response.status_code == 401, name
            expect(response, 401, 100029)
            assert not has_rate_headers(response), name
    # None of the refused calls touched the account's budget: 5 good calls still pass,
    # and the scheme name is case-insensitive (RFC 9110 11.1).
    for scheme in ("Bearer", "bearer", "BEARER", "Bearer", "Bearer"):
        headers = {"Authorization": f"{scheme} {tenant.token}"}
        expect(await client.post("/v1/send", json=SEND_EXAMPLE, headers=headers), 200, 0)


async def test_revoked_key_is_100029_and_other_keys_still_work(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    other = await keys.create(services.db, services.box, tenant.account_id, name="second")
    expect(await send(client, tenant), 200, 0)
    await keys.revoke(services.db, tenant.key_prefix)
    expect(await send(client, tenant), 401, 100029)
    response = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    expect(response, 401, 100029)
    headers = {"Authorization": f"Bearer {other.api_key}"}
    expect(await client.post("/v1/send", json=SEND_EXAMPLE, headers=headers), 200, 0)


async def test_revoked_key_of_inactive_expired_account_is_100029(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, active=False)
    await accounts.set_plan(services.db, tenant.account_id, expires=yesterday())
    await keys.revoke(services.db, tenant.key_prefix)
    expect(await send(client, tenant), 401, 100029)


# --- 2: 100049 --------------------------------------------------------------------------


async def test_inactive_account_is_100049_on_every_endpoint(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, active=False)
    for response in await every_endpoint(client, tenant):
        payload = expect(response, 403, 100049)
        assert payload["message"] == "Please activate your account"
    await accounts.set_active(services.db, tenant.account_id)
    expect(await send(client, tenant), 200, 0)


async def test_inactive_and_expired_is_100049(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, active=False)
    await accounts.set_plan(services.db, tenant.account_id, expires=yesterday())
    expect(await send(client, tenant), 403, 100049)


async def test_inactive_account_calls_do_not_use_the_rate_budget(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, active=False)
    await accounts.set_plan(services.db, tenant.account_id, rate=2)
    for _ in range(4):
        response = await send(client, tenant)
        expect(response, 403, 100049)
    await accounts.set_active(services.db, tenant.account_id)
    expect(await send(client, tenant), 200, 0)
    expect(await send(client, tenant), 200, 0)
    expect(await send(client, tenant), 429, 100025)


# --- 3: 100047 --------------------------------------------------------------------------


async def test_expired_subscription_is_100047_on_every_endpoint(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, expires=yesterday())
    for response in await every_endpoint(client, tenant):
        payload = expect(response, 403, 100047)
        assert "expired" in payload["message"]


async def test_subscription_expiring_today_is_valid_and_renewal_works(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, expires=today())
    expect(await send(client, tenant), 200, 0)
    await accounts.set_plan(services.db, tenant.account_id, expires=yesterday())
    expect(await send(client, tenant), 403, 100047)
    await accounts.set_plan(services.db, tenant.account_id, expires="never")
    expect(await send(client, tenant), 200, 0)


async def test_expired_and_rate_limited_is_100047(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, rate=2)
    expect(await send(client, tenant), 200, 0)
    expect(await send(client, tenant), 200, 0)
    expect(await send(client, tenant), 429, 100025)
    await accounts.set_plan(services.db, tenant.account_id, expires=yesterday())
    expect(await send(client, tenant), 403, 100047)
    expect(await send(client, tenant), 403, 100047)


async def test_expired_and_bad_params_is_100047(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, expires=yesterday())
    expect(await send(client, tenant, {"from": "nope"}), 403, 100047)


# --- 4: 100025 --------------------------------------------------------------------------


async def test_sixth_call_in_a_second_is_100025(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for _ in range(5):
        expect(await send(client, tenant), 200, 0)
    response = await send(client, tenant)
    payload = expect(response, 429, 100025)
    assert payload["message"] == "Exceeding the maximum sending limit"
    assert int(response.headers["retry-after"]) >= 1
    assert has_rate_headers(response)
    assert response.headers["x-ratelimit-remaining"] == "0"


async def test_rate_limited_wins_over_every_later_check(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender="info", verified=False)
    await accounts.set_plan(services.db, tenant.account_id, rate=1, max_size=600, daily=1)
    expect(await send(client, tenant, {"from": "nope"}), 400, 100033)
    expect(await send(client, tenant, {"from": "nope"}), 429, 100025)  # + bad params
    expect(await send(client, tenant, send_payload(body="x" * 5000)), 429, 100025)  # + too large
    expect(await send(client, tenant), 429, 100025)  # + unverified domain, unknown sender


# --- 5: 100033 --------------------------------------------------------------------------

BAD_SEND = {
    "missing to": (send_payload(to=None), "'to' is required"),
    "missing from": (send_payload(**{"from": None}), "'from' is required"),
    "missing subject": (send_payload(subject=None), "'subject' is required"),
    "missing body": (send_payload(body=None), "'body' is required"),
    "invalid from": (send_payload(**{"from": "not-an-address"}), "'from'"),
    "from without domain": (send_payload(**{"from": "from@"}), "'from'"),
    "invalid to": (send_payload(to="to@@example.com"), "'to'"),
    "two recipients": (send_payload(to="a@example.com, b@example.com"), "'to'"),
    "to is a number": (send_payload(to=12345), "'to'"),
    "to is a list": (send_payload(to=["to@example.com"]), "'to'"),
    "CRLF in subject": (send_payload(subject="Hi\r\nBcc: victim@example.org"), "'subject'"),
    "LF in subject": (send_payload(subject="Hi\nBcc: victim@example.org"), "'subject'"),
    "CR in subject": (send_payload(subject="Hi\rthere"), "'subject'"),
    "CRLF in from": (
        send_payload(**{"from": "from@example.com\r\nBcc: victim@example.org"}),
        "'from'",
    ),
    "CRLF in from name": (
        send_payload(**{"from": "Evil\r\nBcc: victim@example.org <from@example.com>"}),
        "'from'",
    ),
    "LF in to": (send_payload(to="to@example.com\nBcc: victim@example.org"), "'to'"),
    "empty subject": (send_payload(subject=""), "'subject'"),
    "empty body": (send_payload(body=""), "'body'"),
    "unknown field": (send_payload(cc="cc@example.com"), "'cc'"),
    "another unknown field": (send_payload(html="<p>hi</p>"), "'html'"),
}


async def test_bad_send_params_are_400_naming_the_field(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await roomy_tenant(services)
    for case, (payload, needle) in BAD_SEND.items():
        response = await send(client, tenant, payload)
        assert response.status_code == 400, (case, response.text)
        body = expect(response, 400, 100033)
        assert body["message"].startswith("Bad request parameters"), case
        assert needle in body["message"], (case, body["message"])
        assert has_rate_headers(response), case
    assert await messages.sent_today(services.db, tenant.account_id) == 0


BAD_BODIES = {
    "not JSON": (b'{"from": "from@example.com", ', "JSON"),
    "JSON array": (b'[{"from": "from@example.com"}]', "JSON object"),
    "JSON string": (b'"hello"', ""),
    "plain text": (b"hello world", ""),
    "empty": (b"", "'from' is required"),
    "JSON with invalid UTF-8": (b'{"from": "\xff@example.com"}', ""),
    "form with invalid UTF-8": (b"from=\xff%40example.com", ""),
}


async def test_unreadable_send_bodies_are_400(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await roomy_tenant(services)
    headers = {**tenant.auth, "Content-Type": "application/json"}
    for case, (raw, needle) in BAD_BODIES.items():
        response = await client.post("/v1/send", content=raw, headers=headers)
        assert response.status_code == 400, (case, response.text)
        body = expect(response, 400, 100033)
        assert needle in body["message"], (case, body["message"])


async def test_from_with_display_name_or_other_case_is_accepted(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    for sender in (
        "Acme <from@example.com>",
        '"Acme, Inc." <from@example.com>',
        "FROM@EXAMPLE.COM",
    ):
        response = await send(client, tenant, send_payload(**{"from": sender}))
        payload = expect(response, 200, 0)
        stored = await messages.find(services.db, payload["requestId"])
        assert stored is not None
        assert stored["from_addr"] == "from@example.com", sender


async def test_contact_params_name_the_field(client: httpx.AsyncClient, tenant: Tenant) -> None:
    listed = await client.get("/v1/contact", headers=tenant.auth)
    assert "'appId'" in expect(listed, 400, 100033)["message"]
    deleted = await client.delete(
        "/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth
    )
    assert "'emailAddress'" in expect(deleted, 400, 100033)["message"]
    saved = await client.post(
        "/v1/contact", json={**contact(tenant), "status": "Maybe"}, headers=tenant.auth
    )
    assert "'status'" in expect(saved, 400, 100033)["message"]


async def test_bad_params_and_unverified_domain_is_100033(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, verified=False)
    expect(await send(client, tenant, send_payload(subject=None)), 400, 100033)
    expect(await send(client, tenant), 403, 100030)


async def test_bad_params_and_too_large_is_100033(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, max_size=600)
    payload = send_payload(body="x" * 2000, to="not an address")
    expect(await send(client, tenant, payload), 400, 100033)


# --- 6: 100023 --------------------------------------------------------------------------


async def test_message_over_the_plan_size_is_100023(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, max_size=1024)
    expect(await send(client, tenant, send_payload(body="x" * 100)), 200, 0)
    response = await send(client, tenant, send_payload(body="x" * 2000))
    payload = expect(response, 413, 100023)
    assert payload["message"] == "Email too large"
    assert has_rate_headers(response)
    assert await messages.sent_today(services.db, tenant.account_id) == 1


async def test_body_far_over_the_plan_size_is_refused_413(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, max_size=1024)
    big = send_payload(body="x" * (200 * 1024))
    expect(await send(client, tenant, big), 413, 100023)


async def test_multibyte_body_is_measured_in_bytes(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, max_size=1024)
    # 400 characters but 1200 bytes of UTF-8.
    expect(await send(client, tenant, send_payload(body="€" * 400)), 413, 100023)


async def test_too_large_and_unknown_sender_is_100023(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender="info")
    await accounts.set_plan(services.db, tenant.account_id, max_size=1024)
    expect(await send(client, tenant, send_payload(body="x" * 2000)), 413, 100023)


async def test_too_large_and_unverified_domain_is_100023(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, verified=False)
    await accounts.set_plan(services.db, tenant.account_id, max_size=1024)
    expect(await send(client, tenant, send_payload(body="x" * 2000)), 413, 100023)


# --- 7: 100030 --------------------------------------------------------------------------


async def test_unverified_domain_is_100030(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, verified=False)
    response = await send(client, tenant)
    payload = expect(response, 403, 100030)
    assert payload["message"] == "The sending domain is invalid"
    assert has_rate_headers(response)
    await domains.set_verified(services.db, tenant.account_id, "example.com", True)
    expect(await send(client, tenant), 200, 0)


async def test_domain_not_of_the_account_is_100030(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await roomy_tenant(services)
    for sender in (
        "from@example.org",
        "from@sub.example.com",
        "from@example.com.evil.org",
        "from@xample.com",
    ):
        response = await send(client, tenant, send_payload(**{"from": sender}))
        assert response.status_code == 403, (sender, response.text)
        expect(response, 403, 100030)


async def test_domain_verified_by_another_account_is_100030(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await make_tenant(services, name="Other", domain="other.example")
    payload = send_payload(**{"from": "from@other.example"})
    expect(await send(client, tenant, payload), 403, 100030)


async def test_unverified_domain_and_unknown_sender_is_100030(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, verified=False, sender="info")
    expect(await send(client, tenant), 403, 100030)


async def test_unverified_domain_and_daily_limit_reached_is_100030(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, daily=1)
    expect(await send(client, tenant), 200, 0)
    expect(await send(client, tenant), 429, 100031)
    await domains.set_verified(services.db, tenant.account_id, "example.com", False)
    expect(await send(client, tenant), 403, 100030)


# --- 8: 100048 --------------------------------------------------------------------------


async def test_unregistered_sender_of_verified_domain_is_100048(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender="info")
    response = await send(client, tenant)
    expect(response, 403, 100048)
    assert has_rate_headers(response)
    for sender in ("info@example.com", "INFO@Example.COM", "Info Desk <info@example.com>"):
        expect(await send(client, tenant, send_payload(**{"from": sender})), 200, 0)
    await domains.add_sender(services.db, tenant.account_id, "from@example.com")
    expect(await send(client, tenant), 200, 0)


async def test_verified_domain_without_any_sender_is_100048(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender=None)
    expect(await send(client, tenant), 403, 100048)


async def test_wildcard_sender_allows_any_address(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender="info")
    expect(await send(client, tenant), 403, 100048)
    await domains.add_sender(services.db, tenant.account_id, "*@example.com")
    for local in ("from", "noreply", "x.y+z"):
        payload = send_payload(**{"from": f"{local}@example.com"})
        expect(await send(client, tenant, payload), 200, 0)


async def test_wildcard_of_another_account_does_not_apply(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender="info")
    await make_tenant(services, name="Other", sender="*")  # same domain name, its own row
    expect(await send(client, tenant), 403, 100048)


async def test_unknown_sender_and_daily_limit_reached_is_100048(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, sender="info")
    await accounts.set_plan(services.db, tenant.account_id, daily=1)
    expect(await send(client, tenant, send_payload(**{"from": "info@example.com"})), 200, 0)
    expect(await send(client, tenant), 403, 100048)


# --- 9: 100031 --------------------------------------------------------------------------


async def test_daily_limit_is_100031(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, daily=2)
    expect(await send(client, tenant), 200, 0)
    expect(await send(client, tenant), 200, 0)
    response = await send(client, tenant)
    payload = expect(response, 429, 100031)
    assert payload["message"] == "You have reached the maximum daily sending limit"
    assert has_rate_headers(response)
    assert "retry-after" not in response.headers
    assert await messages.sent_today(services.db, tenant.account_id) == 2
    # The daily limit counts messages only; the contact endpoints still answer.
    listed = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    expect(listed, 200, 0)


async def test_refused_sends_do_not_count_against_the_daily_limit(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await roomy_tenant(services, sender="info")
    await accounts.set_plan(services.db, tenant.account_id, daily=1, max_size=1024)
    good = send_payload(**{"from": "info@example.com"})
    expect(await send(client, tenant, {**good, "to": "bad"}), 400, 100033)
    expect(await send(client, tenant, {**good, "body": "x" * 2000}), 413, 100023)
    expect(await send(client, tenant), 403, 100048)
    expect(await send(client, tenant, {**good, "from": "info@example.org"}), 403, 100030)
    expect(await send(client, tenant, good), 200, 0)
    expect(await send(client, tenant, good), 429, 100031)


async def test_daily_limit_is_per_account(client: httpx.AsyncClient, services: Services) -> None:
    first = await make_tenant(services)
    second = await make_tenant(services, name="Second")
    await accounts.set_plan(services.db, first.account_id, daily=1)
    expect(await send(client, first), 200, 0)
    expect(await send(client, first), 429, 100031)
    expect(await send(client, second), 200, 0)


# --- rate-limit headers on every response past auth ------------------------------------


async def test_rate_headers_on_responses_past_the_account_checks(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await roomy_tenant(services, sender="info")
    await accounts.set_plan(services.db, tenant.account_id, daily=1, max_size=1024)
    good = send_payload(**{"from": "info@example.com"})
    responses = [
        await send(client, tenant, good),
        await send(client, tenant, {**good, "to": "bad"}),
        await send(client, tenant, {**good, "body": "x" * 2000}),
        await send(client, tenant, {**good, "from": "x@example.org"}),
        await send(client, tenant),
        await send(client, tenant, good),
        await client.get("/v1/contact", headers=tenant.auth),
    ]
    assert [r.json()["code"] for r in responses] == [
        0,
        100033,
        100023,
        100030,
        100048,
        100031,
        100033,
    ]
    remaining = []
    for response in responses:
        assert has_rate_headers(response)
        assert response.headers["x-ratelimit-limit"] == "1000"
        remaining.append(int(response.headers["x-ratelimit-remaining"]))
    assert remaining == sorted(remaining, reverse=True)
    assert remaining[0] > remaining[-1]


# --- routes ------------------------------------------------------------------------------


async def test_unknown_route_is_404_envelope(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for method, path in (
        ("GET", "/v1/nope"),
        ("POST", "/v2/send"),
        ("GET", "/v1/"),
        ("DELETE", "/v1/send/extra"),
    ):
        for headers in ({}, tenant.auth):
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 404, (method, path)
            payload = expect(response, 404, 100404)
            assert payload["data"] is None


async def test_wrong_method_is_405_envelope(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for method, path in (
        ("GET", "/v1/send"),
        ("DELETE", "/v1/send"),
        ("PUT", "/v1/contact"),
        ("PATCH", "/v1/contact"),
    ):
        for headers in ({}, tenant.auth):
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 405, (method, path)
            expect(response, 405, 100405)
            assert "allow" in response.headers


def _allowed(response: httpx.Response) -> set[str]:
    return {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}


async def test_405_allow_header_lists_every_method_of_the_resource(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    # RFC 9110 15.5.6: a 405 response lists every method the target resource supports.
    send_405 = await client.get("/v1/send", headers=tenant.auth)
    assert "POST" in _allowed(send_405)
    contact_405 = await client.put("/v1/contact", headers=tenant.auth)
    assert {"GET", "POST", "DELETE"} <= _allowed(contact_405), contact_405.headers


# --- 100500 -----------------------------------------------------------------------------


async def test_unexpected_fault_is_generic_500_logged_with_request_id(
    client: httpx.AsyncClient,
    services: Services,
    tenant: Tenant,
    backend: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = structlog.get_config() if structlog.is_configured() else None
    logs.configure(json=True)
    hidden = "messages_hidden_" + secrets.token_hex(4)
    try:
        async with services.db.begin() as conn:
            if backend == "postgres":
                # The PostgreSQL database is shared by the session: hide the table, then
                # put it back exactly as it was (a DROP would break later tests).
                await conn.execute(sa.text(f"ALTER TABLE messages RENAME TO {hidden}"))
            else:
                await conn.execute(sa.text("DROP TABLE messages"))
        capsys.readouterr()
        response = await send(client, tenant)
        await asyncio.sleep(0)  # access lines go out at the end of the loop's turn
    finally:
        if backend == "postgres":
            async with services.db.begin() as conn:
                await conn.execute(sa.text(f"ALTER TABLE {hidden} RENAME TO messages"))
        if saved is None:
            structlog.reset_defaults()
        else:
            structlog.configure(**saved)

    payload = expect(response, 500, 100500)
    assert payload["message"] == "Internal server error"
    text = response.text
    for leak in (
        "Traceback",
        "messages",
        hidden,
        "INSERT",
        "SELECT",
        "sqlalchemy",
        "sqlite",
        "asyncpg",
        "relation",
        "no such table",
    ):
        assert leak.lower() not in text.lower(), leak

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.get("event") == "unhandled_error"]
    assert len(errors) == 1, lines
    assert errors[0]["request_id"] == payload["requestId"]
    assert errors[0]["level"] == "error"
    assert "Traceback" in errors[0]["exception"]
    access = [line for line in lines if line.get("event") == "request"]
    assert access and access[-1]["request_id"] == payload["requestId"]
    assert access[-1]["status"] == 500
