"""One account can neither see nor touch another account's contacts, nor learn that
another account's appId exists: it answers exactly like an appId nobody has."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from sendkit import accounts
from sendkit.services import Services
from tests.conftest import Tenant, assert_envelope, make_tenant

JSON_UTF8 = {"Content-Type": "application/json; charset=utf-8"}
NOBODYS_APP = "9999999999999999"
A_CONTACT = {
    "emailAddress": "secret.customer@example.com",
    "status": "Confirmed",
    "data": {
        "language": "en",
        "firstName": "Secret",
        "lastName": "Customer",
        "phoneNumber": "5550100",
        "birthday": "24/12",
        "company": "Alpha Inc.",
        "vipLevel": 9,
        "amount": "9999.99",
    },
}


async def _tenant(services: Services, name: str, domain: str) -> Tenant:
    made = await make_tenant(services, name=name, domain=domain)
    await accounts.set_plan(services.db, made.account_id, rate=10_000)
    return made


@pytest.fixture
async def alpha(services: Services) -> Tenant:
    return await _tenant(services, "Alpha", "alpha.example")


@pytest.fixture
async def beta(services: Services) -> Tenant:
    return await _tenant(services, "Beta", "beta.example")


def comparable(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """Status and envelope, without the parts that differ on every request."""
    payload = response.json()
    assert_envelope(payload, payload["code"])
    return response.status_code, {k: v for k, v in payload.items() if k not in ("requestId", "ts")}


async def alpha_listing(client: httpx.AsyncClient, alpha: Tenant) -> dict[str, Any]:
    response = await client.get("/v1/contact", params={"appId": alpha.app_id}, headers=alpha.auth)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


@pytest.fixture
async def alpha_before(client: httpx.AsyncClient, alpha: Tenant, beta: Tenant) -> dict[str, Any]:
    saved = await client.post(
        "/v1/contact", json={"appId": alpha.app_id, **A_CONTACT}, headers=alpha.auth
    )
    assert saved.status_code == 200, saved.text
    before = await alpha_listing(client, alpha)
    assert before["total"] == 1
    return before


async def test_get_with_another_accounts_app_id_looks_like_a_missing_app(
    client: httpx.AsyncClient, alpha: Tenant, beta: Tenant, alpha_before: dict[str, Any]
) -> None:
    async def get(app_id: Any, where: str) -> httpx.Response:
        if where == "query":
            return await client.get("/v1/contact", params={"appId": app_id}, headers=beta.auth)
        body = (
            f"appId={app_id}&page=1&pageSize=50".encode()
            if where == "form"
            else json.dumps({"appId": app_id, "page": 1}).encode()
        )
        return await client.request(
            "GET", "/v1/contact", content=body, headers={**JSON_UTF8, **beta.auth}
        )

    for where in ("query", "form", "json"):
        foreign = await get(alpha.app_id, where)
        missing = await get(NOBODYS_APP, where)
        assert foreign.status_code != 200, foreign.text
        assert comparable(foreign) == comparable(missing), where
        assert foreign.json()["data"] is None
        assert "secret.customer" not in foreign.text
    as_number = await get(int(alpha.app_id), "json")
    assert comparable(as_number) == comparable(await get(int(NOBODYS_APP), "json"))

    assert await alpha_listing(client, alpha) == alpha_before


async def test_post_with_another_accounts_app_id_looks_like_a_missing_app(
    client: httpx.AsyncClient, alpha: Tenant, beta: Tenant, alpha_before: dict[str, Any]
) -> None:
    takeover = {
        "emailAddress": "SECRET.CUSTOMER@example.com",
        "status": "Unsubscribed",
        "data": {"firstName": "Mallory", "vipLevel": 0, "amount": "0"},
    }
    for extra in ({}, {"data": {"company": "Beta"}}, {"emailAddress": "new@example.com"}):
        body = {**takeover, **extra}
        foreign = await client.post(
            "/v1/contact", json={"appId": alpha.app_id, **body}, headers=beta.auth
        )
        missing = await client.post(
            "/v1/contact", json={"appId": NOBODYS_APP, **body}, headers=beta.auth
        )
        assert foreign.status_code != 200, foreign.text
        assert comparable(foreign) == comparable(missing), extra
    # Invalid input is judged the same way whichever appId it names.
    for bad in ({"status": "Pending"}, {"data": {"nickname": "x"}}):
        body = {**takeover, **bad}
        foreign = await client.post(
            "/v1/contact", json={"appId": alpha.app_id, **body}, headers=beta.auth
        )
        missing = await client.post(
            "/v1/contact", json={"appId": NOBODYS_APP, **body}, headers=beta.auth
        )
        assert comparable(foreign) == comparable(missing), bad

    assert await alpha_listing(client, alpha) == alpha_before


async def test_delete_with_another_accounts_app_id_looks_like_a_missing_app(
    client: httpx.AsyncClient, alpha: Tenant, beta: Tenant, alpha_before: dict[str, Any]
) -> None:
    for email in ("secret.customer@example.com", "SECRET.CUSTOMER@EXAMPLE.COM", "x@example.com"):
        foreign = await client.delete(
            "/v1/contact",
            params={"appId": alpha.app_id, "emailAddress": email},
            headers=beta.auth,
        )
        missing = await client.delete(
            "/v1/contact",
            params={"appId": NOBODYS_APP, "emailAddress": email},
            headers=beta.auth,
        )
        assert foreign.status_code != 200, foreign.text
        assert comparable(foreign) == comparable(missing), email
        body = json.dumps({"appId": alpha.app_id, "emailAddress": email}).encode()
        in_body = await client.request(
            "DELETE", "/v1/contact", content=body, headers={**JSON_UTF8, **beta.auth}
        )
        assert comparable(in_body) == comparable(missing), email

    assert await alpha_listing(client, alpha) == alpha_before


async def test_each_account_sees_only_its_own_contacts(
    client: httpx.AsyncClient, alpha: Tenant, beta: Tenant, alpha_before: dict[str, Any]
) -> None:
    # The same address in both accounts: two separate contacts.
    mine = {
        "appId": beta.app_id,
        "emailAddress": "secret.customer@example.com",
        "status": "Unsubscribed",
        "data": {"firstName": "Beta's own"},
    }
    saved = await client.post("/v1/contact", json=mine, headers=beta.auth)
    assert saved.status_code == 200, saved.text
    await client.post(
        "/v1/contact",
        json={"appId": beta.app_id, "emailAddress": "b@example.com", "status": "Confirmed"},
        headers=beta.auth,
    )

    response = await client.get("/v1/contact", params={"appId": beta.app_id}, headers=beta.auth)
    data = response.json()["data"]
    assert data["total"] == 2
    assert [(i["emailAddress"], i["status"], i["firstName"]) for i in data["list"]] == [
        ("secret.customer@example.com", "Unsubscribed", "Beta's own"),
        ("b@example.com", "Confirmed", ""),
    ]
    assert "Alpha Inc." not in response.text

    # Beta deleting its own copy leaves Alpha's alone.
    deleted = await client.delete(
        "/v1/contact",
        params={"appId": beta.app_id, "emailAddress": "secret.customer@example.com"},
        headers=beta.auth,
    )
    assert deleted.status_code == 200, deleted.text
    assert await alpha_listing(client, alpha) == alpha_before

    # And Alpha, symmetrically, cannot reach Beta's app.
    foreign = await client.get("/v1/contact", params={"appId": beta.app_id}, headers=alpha.auth)
    missing = await client.get("/v1/contact", params={"appId": NOBODYS_APP}, headers=alpha.auth)
    assert comparable(foreign) == comparable(missing)
