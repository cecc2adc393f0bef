"""The three `/v1/contact` endpoints, as documented, on both databases."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from sendkit import accounts
from sendkit.accounts import new_id
from sendkit.db import apps as apps_table
from sendkit.db import now_ms
from sendkit.services import Services
from tests.conftest import Tenant, assert_envelope, make_tenant

JSON_UTF8 = {"Content-Type": "application/json; charset=utf-8"}
DATA_KEYS = {
    "language",
    "firstName",
    "lastName",
    "phoneNumber",
    "birthday",
    "company",
    "vipLevel",
    "amount",
}
ITEM_KEYS = {"emailAddress", "status"} | DATA_KEYS

# The documented request body and list item, verbatim.
DOC_APP_ID = "1234567890"
DOC_SAVE_BODY = """{
  "appId": "1234567890",
  "emailAddress": "john.doe@example.com",
  "status": "Confirmed",
  "data": {
    "language": "en",
    "firstName": "John",
    "lastName": "Doe",
    "phoneNumber": "1234567890",
    "birthday": "1990-01-01",
    "company": "Example Inc.",
    "vipLevel": 1,
    "amount": "100.00"
  }
}"""
DOC_ITEM = {
    "emailAddress": "john.doe@example.com",
    "status": "Confirmed",
    "language": "en",
    "firstName": "John",
    "lastName": "Doe",
    "phoneNumber": "1234567890",
    "birthday": "1990-01-01",
    "company": "Example Inc.",
    "vipLevel": 1,
    "amount": "100.00",
}


@pytest.fixture
async def tenant(services: Services) -> Tenant:
    """A tenant whose plan allows more than the default 5 requests per second."""
    made = await make_tenant(services)
    await accounts.set_plan(services.db, made.account_id, rate=10_000)
    return made


async def save(
    client: httpx.AsyncClient,
    tenant: Tenant,
    email: str,
    status: str = "Confirmed",
    data: dict[str, Any] | None = None,
    app_id: str | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "appId": app_id or tenant.app_id,
        "emailAddress": email,
        "status": status,
    }
    if data is not None:
        body["data"] = data
    return await client.post("/v1/contact", json=body, headers=tenant.auth)


async def save_ok(client: httpx.AsyncClient, tenant: Tenant, email: str, **kw: Any) -> None:
    response = await save(client, tenant, email, **kw)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert_envelope(payload, 0)
    assert payload["message"] == "Successfully"
    assert payload["data"] is None


async def listing(client: httpx.AsyncClient, tenant: Tenant, **params: Any) -> dict[str, Any]:
    params.setdefault("appId", tenant.app_id)
    response = await client.get("/v1/contact", params=params, headers=tenant.auth)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert_envelope(payload, 0)
    data: dict[str, Any] = payload["data"]
    assert set(data) == {"total", "page", "pageSize", "list"}
    for item in data["list"]:
        assert set(item) == ITEM_KEYS
    return data


async def only_item(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    data = await listing(client, tenant)
    assert data["total"] == 1 and len(data["list"]) == 1
    item: dict[str, Any] = data["list"][0]
    return item


def assert_bad_request(
    response: httpx.Response, field: str, status: int = 400, case: Any = None
) -> None:
    assert response.status_code == status, (case, response.text)
    payload = response.json()
    assert_envelope(payload, 100033)
    assert payload["data"] is None
    assert field in payload["message"], (case, payload["message"])


async def add_app(services: Services, account_id: str, app_id: str) -> None:
    async with services.db.begin() as conn:
        await conn.execute(
            apps_table.insert().values(
                id=new_id(),
                account_id=account_id,
                app_id=app_id,
                name="second app",
                created_at=now_ms(),
            )
        )


# --- GET /v1/contact ---------------------------------------------------------------


async def test_pages_follow_creation_order_and_total_counts_the_app(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    # Reverse alphabetical, so creation order and address order disagree.
    emails = [f"{letter}@example.com" for letter in "gfedcba"]
    for email in emails:
        await save_ok(client, tenant, email)
    # An update must not move a contact.
    await save_ok(client, tenant, emails[0], data={"firstName": "Gee"})

    pages = [await listing(client, tenant, page=p, pageSize=3) for p in (1, 2, 3, 4)]
    assert [len(p["list"]) for p in pages] == [3, 3, 1, 0]
    assert all(p["total"] == 7 and p["pageSize"] == 3 for p in pages)
    assert [p["page"] for p in pages] == [1, 2, 3, 4]
    seen = [item["emailAddress"] for p in pages for item in p["list"]]
    assert seen == emails
    assert pages[0]["list"][0]["firstName"] == "Gee"

    again = await listing(client, tenant, page=2, pageSize=3)
    assert again == pages[1]
    everything = await listing(client, tenant)
    assert [i["emailAddress"] for i in everything["list"]] == emails


async def test_total_counts_only_the_requested_app(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    other_app = "5550000000000001"
    await add_app(services, tenant.account_id, other_app)
    await save_ok(client, tenant, "one@example.com")
    await save_ok(client, tenant, "two@example.com")
    await save_ok(client, tenant, "one@example.com", app_id=other_app)

    mine = await listing(client, tenant)
    other = await listing(client, tenant, appId=other_app)
    assert mine["total"] == 2
    assert [i["emailAddress"] for i in mine["list"]] == ["one@example.com", "two@example.com"]
    assert other["total"] == 1
    assert [i["emailAddress"] for i in other["list"]] == ["one@example.com"]


async def test_every_field_is_present_on_every_item(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await save_ok(client, tenant, "bare@example.com", status="Unsubscribed")
    await save_ok(client, tenant, "some@example.com", data={"company": "Acme"})
    data = await listing(client, tenant)
    bare, some = data["list"]
    assert bare == {
        "emailAddress": "bare@example.com",
        "status": "Unsubscribed",
        "language": "",
        "firstName": "",
        "lastName": "",
        "phoneNumber": "",
        "birthday": "",
        "company": "",
        "vipLevel": 0,
        "amount": "",
    }
    assert type(bare["vipLevel"]) is int
    assert some["company"] == "Acme" and some["firstName"] == "" and some["vipLevel"] == 0

    # And every field given comes back.
    data = {
        "language": "de",
        "firstName": "Jürgen",
        "lastName": "Müller",
        "phoneNumber": "+49 30 123456",
        "birthday": "05/06",
        "company": "Beispiel GmbH",
        "vipLevel": "4",
        "amount": 12.25,
    }
    await save_ok(client, tenant, "jm@example.com", data=data)
    item = (await listing(client, tenant))["list"][2]
    assert item == {
        "emailAddress": "jm@example.com",
        "status": "Confirmed",
        **data,
        "vipLevel": 4,
        "amount": "12.25",
    }


async def test_list_defaults_and_parameter_checks(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert await listing(client, tenant) == {"total": 0, "page": 1, "pageSize": 500, "list": []}

    await save_ok(client, tenant, "a@example.com")
    for size in (1, 1000):
        data = await listing(client, tenant, pageSize=size)
        assert data["pageSize"] == size and data["total"] == 1 and len(data["list"]) == 1
    bad = [
        ({"pageSize": "1001"}, "pageSize"),
        ({"pageSize": "0"}, "pageSize"),
        ({"pageSize": "-5"}, "pageSize"),
        ({"pageSize": "abc"}, "pageSize"),
        ({"pageSize": "2.5"}, "pageSize"),
        ({"page": "0"}, "page"),
        ({"page": "abc"}, "page"),
    ]
    for params, field in bad:
        response = await client.get(
            "/v1/contact", params={"appId": tenant.app_id, **params}, headers=tenant.auth
        )
        assert_bad_request(response, f"'{field}'", case=params)

    response = await client.get("/v1/contact", headers=tenant.auth)
    assert_bad_request(response, "appId")
    response = await client.get("/v1/contact", params={"appId": "42"}, headers=tenant.auth)
    assert_bad_request(response, "appId", status=404)


async def test_parameters_in_a_get_body(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for n in range(3):
        await save_ok(client, tenant, f"c{n}@example.com")

    async def get(body: bytes) -> httpx.Response:
        # As the documented curl does: a body on GET, under a JSON content type.
        return await client.request(
            "GET", "/v1/contact", content=body, headers={**JSON_UTF8, **tenant.auth}
        )

    response = await get(f"appId={tenant.app_id}&page=1&pageSize=50".encode())
    assert response.status_code == 200, response.text
    payload = response.json()
    assert_envelope(payload, 0)
    assert payload["data"]["total"] == 3
    assert payload["data"]["page"] == 1
    assert payload["data"]["pageSize"] == 50
    assert [i["emailAddress"] for i in payload["data"]["list"]] == [
        "c0@example.com",
        "c1@example.com",
        "c2@example.com",
    ]

    # The body's page and pageSize are obeyed, not just its appId.
    data = (await get(f"appId={tenant.app_id}&page=2&pageSize=2".encode())).json()["data"]
    assert data["page"] == 2 and data["pageSize"] == 2 and data["total"] == 3
    assert [i["emailAddress"] for i in data["list"]] == ["c2@example.com"]

    # A JSON body works the same way.
    body = json.dumps({"appId": tenant.app_id, "page": 1, "pageSize": 2}).encode()
    response = await get(body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["total"] == 3 and data["page"] == 1 and data["pageSize"] == 2
    assert [i["emailAddress"] for i in data["list"]] == ["c0@example.com", "c1@example.com"]

    # And its values are checked the same way.
    for bad in (
        f"appId={tenant.app_id}&pageSize=1001".encode(),
        f"appId={tenant.app_id}&pageSize=abc".encode(),
        json.dumps({"appId": tenant.app_id, "pageSize": 1001}).encode(),
        json.dumps({"appId": tenant.app_id, "pageSize": 0}).encode(),
    ):
        assert_bad_request(await get(bad), "pageSize", case=bad)


# --- POST /v1/contact --------------------------------------------------------------


async def test_documented_example_round_trips(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await add_app(services, tenant.account_id, DOC_APP_ID)
    saved = await client.post(
        "/v1/contact", content=DOC_SAVE_BODY.encode(), headers={**JSON_UTF8, **tenant.auth}
    )
    assert saved.status_code == 200, saved.text
    payload = saved.json()
    assert_envelope(payload, 0)
    assert payload["message"] == "Successfully" and payload["data"] is None

    # Exactly the documented curl for the list.
    listed = await client.request(
        "GET",
        "/v1/contact",
        content=b"appId=1234567890&page=1&pageSize=50",
        headers={**JSON_UTF8, **tenant.auth},
    )
    assert listed.status_code == 200, listed.text
    payload = listed.json()
    assert_envelope(payload, 0)
    assert payload["message"] == "Successfully"
    assert payload["data"] == {"total": 1, "page": 1, "pageSize": 50, "list": [DOC_ITEM]}


async def test_update_merges_data_and_keeps_status(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await save_ok(
        client,
        tenant,
        "jane@example.com",
        status="Confirmed",
        data={"firstName": "Jane", "lastName": "Roe", "vipLevel": 2, "amount": "5.00"},
    )
    await save_ok(
        client,
        tenant,
        "jane@example.com",
        status="Unsubscribed",
        data={"lastName": "Doe", "company": "Example Inc."},
    )
    item = await only_item(client, tenant)
    assert item == {
        "emailAddress": "jane@example.com",
        "status": "Confirmed",
        "language": "",
        "firstName": "Jane",
        "lastName": "Doe",
        "phoneNumber": "",
        "birthday": "",
        "company": "Example Inc.",
        "vipLevel": 2,
        "amount": "5.00",
    }

    # No data at all: nothing changes, not even the status.
    await save_ok(client, tenant, "jane@example.com", status="Unsubscribed")
    assert await only_item(client, tenant) == item

    # Nor does an update confirm an unsubscribed contact.
    await save_ok(client, tenant, "gone@example.com", status="Unsubscribed")
    await save_ok(client, tenant, "gone@example.com", status="Confirmed", data={"language": "fr"})
    gone = (await listing(client, tenant))["list"][1]
    assert (gone["status"], gone["language"]) == ("Unsubscribed", "fr")


async def test_addresses_match_case_insensitively(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await save_ok(client, tenant, "John.Doe@example.com", data={"firstName": "John"})
    await save_ok(client, tenant, "JOHN.DOE@EXAMPLE.COM", data={"lastName": "Doe"})
    await save_ok(client, tenant, "john.doe@Example.Com", data={"company": "Example Inc."})
    item = await only_item(client, tenant)
    assert item["emailAddress"] == "John.Doe@example.com"
    assert (item["firstName"], item["lastName"], item["company"]) == ("John", "Doe", "Example Inc.")


async def test_concurrent_saves_of_one_address_make_one_contact(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    spellings = ["race@example.com", "RACE@example.com", "Race@Example.com", "rAcE@EXAMPLE.COM"]
    fields = ["language", "firstName", "lastName", "company"]
    responses = await asyncio.gather(
        *(
            save(client, tenant, email, data={field: f"v{n}"})
            for n, (email, field) in enumerate(zip(spellings * 2, fields * 2, strict=True))
        )
    )
    for response in responses:
        assert response.status_code == 200, response.text
        assert_envelope(response.json(), 0)
    item = await only_item(client, tenant)
    assert item["emailAddress"].lower() == "race@example.com"
    assert all(item[field] for field in fields)


async def test_birthday_accepts_real_dates_as_dd_mm_or_iso(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    valid = {
        "01/12": "01/12",
        "29/02": "29/02",
        "31/12": "31/12",
        "1990-01-01": "1990-01-01",
        "2024-02-29": "2024-02-29",
    }
    for n, given in enumerate(valid):
        await save_ok(client, tenant, f"b{n}@example.com", data={"birthday": given})
    stored = [i["birthday"] for i in (await listing(client, tenant))["list"]]
    assert stored == list(valid.values())

    invalid = [
        "31/02",
        "30/02",
        "32/01",
        "01/13",
        "00/10",
        "2023-02-29",
        "1990-13-01",
        "1990/01/01",
        "abc",
        19900101,
    ]
    for given in invalid:
        response = await save(client, tenant, "new@example.com", data={"birthday": given})
        assert_bad_request(response, "birthday", case=given)
        response = await save(client, tenant, "b0@example.com", data={"birthday": given})
        assert_bad_request(response, "birthday", case=given)
    after = await listing(client, tenant)
    assert after["total"] == len(valid)
    assert [i["birthday"] for i in after["list"]] == list(valid.values())


async def test_vip_level_and_amount_accept_numbers_and_numeric_strings(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    # vipLevel: a whole number, returned as a number.
    valid = [(1, 1), ("3", 3), (0, 0), (" 7 ", 7)]
    for n, (given, _) in enumerate(valid):
        await save_ok(client, tenant, f"v{n}@example.com", data={"vipLevel": given})
    stored = [i["vipLevel"] for i in (await listing(client, tenant))["list"]]
    assert stored == [expected for _, expected in valid]
    assert all(type(v) is int for v in stored)

    for given in ["x", 1.5, "1.5", True, False, [1], {"level": 1}]:
        response = await save(client, tenant, "v0@example.com", data={"vipLevel": given})
        assert_bad_request(response, "vipLevel", case=given)
    assert (await listing(client, tenant))["list"][0]["vipLevel"] == 1

    # amount: a decimal, returned as the string given (or the number's shortest form).
    amounts = [("100.00", "100.00"), (100.5, "100.5"), (100, "100"), ("0.99", "0.99")]
    for n, (given, _) in enumerate(amounts):
        await save_ok(client, tenant, f"v{n}@example.com", data={"amount": given})
    stored_amounts = [i["amount"] for i in (await listing(client, tenant))["list"]]
    assert stored_amounts == [expected for _, expected in amounts]

    for given in ["abc", "1,5", "NaN", True, [100], {"value": 1}]:
        response = await save(client, tenant, "v0@example.com", data={"amount": given})
        assert_bad_request(response, "amount", case=given)
    assert (await listing(client, tenant))["list"][0]["amount"] == "100.00"


async def test_bad_save_requests_are_rejected_naming_the_field(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    good = {"appId": tenant.app_id, "emailAddress": "r@example.com", "status": "Confirmed"}
    cases: list[tuple[dict[str, Any], str]] = []
    for status in ["Pending", "", "Subscribed", 1, None]:
        cases.append(({**good, "status": status}, "status"))
    for missing in ["appId", "emailAddress", "status"]:
        cases.append(({k: v for k, v in good.items() if k != missing}, missing))
    for email in ["not-an-email", "a@", "@example.com", "a b@example.com", "John <j@example.com>"]:
        cases.append(({**good, "emailAddress": email}, "emailAddress"))
    cases.append(({**good, "data": {"nickname": "Jo"}}, "nickname"))
    cases.append(({**good, "data": {"firstName": "Jo", "Company": "X"}}, "Company"))
    for body, field in cases:
        response = await client.post("/v1/contact", json=body, headers=tenant.auth)
        assert_bad_request(response, field, case=body)
    response = await save(client, tenant, "x@example.com", app_id="999999")
    assert_bad_request(response, "appId", status=404)
    assert (await listing(client, tenant))["total"] == 0


# --- DELETE /v1/contact ------------------------------------------------------------


async def test_delete_by_query_string_or_body(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        await save_ok(client, tenant, email)
    response = await client.delete(
        "/v1/contact",
        params={"appId": tenant.app_id, "emailAddress": "b@example.com"},
        headers={**JSON_UTF8, **tenant.auth},
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    assert_envelope(payload, 0)
    assert payload["data"] is None
    data = await listing(client, tenant)
    assert data["total"] == 2
    assert [i["emailAddress"] for i in data["list"]] == ["a@example.com", "c@example.com"]

    # Case-insensitively.
    await save_ok(client, tenant, "John.Doe@example.com")
    response = await client.delete(
        "/v1/contact",
        params={"appId": tenant.app_id, "emailAddress": "JOHN.DOE@EXAMPLE.COM"},
        headers=tenant.auth,
    )
    assert response.status_code == 200, response.text

    # With the parameters in the body, as form data or JSON.
    form = f"appId={tenant.app_id}&emailAddress=a%40example.com".encode()
    as_json = json.dumps({"appId": tenant.app_id, "emailAddress": "C@example.com"}).encode()
    for body in (form, as_json):
        response = await client.request(
            "DELETE", "/v1/contact", content=body, headers={**JSON_UTF8, **tenant.auth}
        )
        assert response.status_code == 200, (body, response.text)
        assert_envelope(response.json(), 0)
    assert await listing(client, tenant) == {"total": 0, "page": 1, "pageSize": 500, "list": []}


async def test_delete_errors(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await save_ok(client, tenant, "keep@example.com")
    params = {"appId": tenant.app_id, "emailAddress": "nobody@example.com"}
    response = await client.delete("/v1/contact", params=params, headers=tenant.auth)
    assert response.status_code == 404, response.text
    payload = response.json()
    assert_envelope(payload, 100033)
    assert "not found" in payload["message"].lower()

    # Deleting twice: the second one finds nothing.
    params["emailAddress"] = "keep@example.com"
    first = await client.delete("/v1/contact", params=params, headers=tenant.auth)
    second = await client.delete("/v1/contact", params=params, headers=tenant.auth)
    assert first.status_code == 200
    assert second.status_code == 404
    assert_envelope(second.json(), 100033)
    assert "not found" in second.json()["message"].lower()

    await save_ok(client, tenant, "a@example.com")
    for missing in ("appId", "emailAddress"):
        params = {"appId": tenant.app_id, "emailAddress": "a@example.com"}
        del params[missing]
        response = await client.delete("/v1/contact", params=params, headers=tenant.auth)
        assert_bad_request(response, missing, case=params)
    assert (await listing(client, tenant))["total"] == 1


async def test_deleted_contact_can_be_created_again(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await save_ok(client, tenant, "a@example.com", status="Unsubscribed", data={"company": "Old"})
    await save_ok(client, tenant, "b@example.com")
    params = {"appId": tenant.app_id, "emailAddress": "a@example.com"}
    assert (await client.delete("/v1/contact", params=params, headers=tenant.auth)).is_success
    await save_ok(client, tenant, "a@example.com", status="Confirmed")
    data = await listing(client, tenant)
    assert [(i["emailAddress"], i["status"], i["company"]) for i in data["list"]] == [
        ("b@example.com", "Confirmed", ""),
        ("a@example.com", "Confirmed", ""),
    ]
