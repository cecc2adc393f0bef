"""HMAC-SHA256 request signatures: `X-SendKit-Timestamp` and `X-SendKit-Signature`.

The documented string to sign is
    timestamp "\\n" METHOD "\\n" path_with_query "\\n" hex(sha256(raw body))
and the signature is hex(HMAC-SHA256(signing secret, string to sign)). Every failure is 401/100029.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from typing import Any

import httpx

from sendkit import accounts, keys
from sendkit.services import Services
from tests.conftest import SEND_EXAMPLE, Tenant, assert_envelope, make_tenant


def expect(response: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload: dict[str, Any] = response.json()
    assert_envelope(payload, code)
    assert response.headers["x-request-id"] == payload["requestId"]
    return payload


def now() -> str:
    return str(int(time.time()))


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def signed_headers(
    tenant: Tenant,
    method: str,
    path_with_query: str,
    body: bytes = b"",
    *,
    timestamp: str | None = None,
    secret: str | None = None,
) -> dict[str, str]:
    ts = timestamp or now()
    key = secret or tenant.signing_secret
    assert key is not None
    signature = keys.sign_request(key, ts, method, path_with_query, body)
    return {
        **tenant.auth,
        "Content-Type": "application/json",
        "X-SendKit-Timestamp": ts,
        "X-SendKit-Signature": signature,
    }


async def signed_send(
    client: httpx.AsyncClient, tenant: Tenant, body: bytes | None = None, **kwargs: Any
) -> httpx.Response:
    raw = body_of(SEND_EXAMPLE) if body is None else body
    headers = signed_headers(tenant, "POST", "/v1/send", raw, **kwargs)
    return await client.post("/v1/send", content=raw, headers=headers)


# --- the scheme itself (no server) -----------------------------------------------------


def test_string_to_sign_and_signature_match_the_documented_scheme() -> None:
    secret = "ss_unit-test-secret"
    timestamp = "1758864125"
    path = "/v1/contact?appId=1234567890&page=1&pageSize=50"
    body = b'{"from":"from@example.com"}'
    body_hash = hashlib.sha256(body).hexdigest()
    expected_string = f"{timestamp}\nGET\n{path}\n{body_hash}".encode()
    assert keys.string_to_sign(timestamp, "GET", path, body) == expected_string
    # The method is upper-cased whatever the caller passes.
    assert keys.string_to_sign(timestamp, "get", path, body) == expected_string
    expected = hmac.new(secret.encode(), expected_string, hashlib.sha256).hexdigest()
    assert keys.sign_request(secret, timestamp, "GET", path, body) == expected
    assert keys.sign_request(secret, timestamp, "get", path, body) == expected
    assert len(expected) == 64 and expected == expected.lower()


def test_empty_body_signs_the_hash_of_nothing() -> None:
    secret, timestamp, path = "ss_x", "1700000000", "/v1/contact?appId=1"
    empty_hash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    string = f"{timestamp}\nDELETE\n{path}\n{empty_hash}".encode()
    assert keys.string_to_sign(timestamp, "DELETE", path, b"") == string
    expected = hmac.new(b"ss_x", string, hashlib.sha256).hexdigest()
    assert keys.sign_request(secret, timestamp, "DELETE", path, b"") == expected


def test_pinned_signature_vector() -> None:
    # A fixed vector, so a change to the scheme (separator, hash, encoding) cannot pass
    # unnoticed even if the test's own hand computation were changed along with it.
    string = (
        "1758864125\nPOST\n/v1/send\n" + hashlib.sha256(b'{"to":"to@example.com"}').hexdigest()
    ).encode()
    hand = hmac.new(b"ss_vector", string, hashlib.sha256).hexdigest()
    got = keys.sign_request(
        "ss_vector", "1758864125", "POST", "/v1/send", b'{"to":"to@example.com"}'
    )
    assert got == hand


# --- through the API --------------------------------------------------------------------


async def test_good_signed_send_passes(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, signing=True)
    assert tenant.signing_secret is not None
    expect(await signed_send(client, tenant), 200, 0)


async def test_signed_get_with_query_string_passes(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    path = f"/v1/contact?appId={tenant.app_id}&page=1&pageSize=50"
    response = await client.get(path, headers=signed_headers(tenant, "GET", path))
    payload = expect(response, 200, 0)
    assert payload["data"]["pageSize"] == 50


async def test_signed_delete_signs_the_raw_percent_encoded_query(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    contact = {"appId": tenant.app_id, "emailAddress": "john+x@example.com", "status": "Confirmed"}
    expect(await client.post("/v1/contact", json=contact, headers=tenant.auth), 200, 0)
    path = f"/v1/contact?appId={tenant.app_id}&emailAddress=john%2Bx%40example.com"
    response = await client.delete(path, headers=signed_headers(tenant, "DELETE", path))
    expect(response, 200, 0)


async def test_signing_key_still_accepts_unsigned_requests(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    response = await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth)
    expect(response, 200, 0)


async def test_tampered_body_is_100029(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, signing=True)
    original = body_of(SEND_EXAMPLE)
    tampered = body_of({**SEND_EXAMPLE, "to": "attacker@example.org"})
    headers = signed_headers(tenant, "POST", "/v1/send", original)
    expect(await client.post("/v1/send", content=tampered, headers=headers), 401, 100029)
    # Even a whitespace-only change breaks the signature: the raw bytes are signed.
    spaced = json.dumps(SEND_EXAMPLE, indent=2).encode()
    expect(await client.post("/v1/send", content=spaced, headers=headers), 401, 100029)
    # The refused attempts did not burn the signature: the genuine request still passes.
    expect(await client.post("/v1/send", content=original, headers=headers), 200, 0)


async def test_wrong_path_or_query_is_100029(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, signing=True)
    raw = body_of(SEND_EXAMPLE)
    for_contact = signed_headers(tenant, "POST", "/v1/contact", raw)
    expect(await client.post("/v1/send", content=raw, headers=for_contact), 401, 100029)

    signed_path = f"/v1/contact?appId={tenant.app_id}&page=1"
    headers = signed_headers(tenant, "GET", signed_path)
    sent_path = f"/v1/contact?appId={tenant.app_id}&page=2"
    expect(await client.get(sent_path, headers=headers), 401, 100029)
    # The query string is part of what is signed: leaving it out does not match either.
    no_query = signed_headers(tenant, "GET", "/v1/contact")
    expect(await client.get(signed_path, headers=no_query), 401, 100029)
    # Nor does the right path under another method.
    as_post = signed_headers(tenant, "POST", signed_path)
    expect(await client.get(signed_path, headers=as_post), 401, 100029)


async def test_stale_or_future_timestamp_is_100029(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    past = str(int(time.time()) - 301)
    future = str(math.ceil(time.time()) + 301)
    expect(await signed_send(client, tenant, timestamp=past), 401, 100029)
    expect(await signed_send(client, tenant, timestamp=future), 401, 100029)
    inside = str(int(time.time()) - 290)
    expect(await signed_send(client, tenant, timestamp=inside), 200, 0)


async def test_malformed_timestamp_is_100029(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, signing=True)
    for ts in ("yesterday", "1.5e9", "", " "):
        raw = body_of(SEND_EXAMPLE)
        headers = signed_headers(tenant, "POST", "/v1/send", raw, timestamp=ts or "x")
        headers["X-SendKit-Timestamp"] = ts
        response = await client.post("/v1/send", content=raw, headers=headers)
        assert response.status_code == 401, (ts, response.text)
        expect(response, 401, 100029)


async def test_only_one_signature_header_is_100029(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    raw = body_of(SEND_EXAMPLE)
    full = signed_headers(tenant, "POST", "/v1/send", raw)
    for missing in ("X-SendKit-Timestamp", "X-SendKit-Signature"):
        headers = {k: v for k, v in full.items() if k != missing}
        expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)


async def test_replayed_request_is_100029(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, signing=True)
    raw = body_of(SEND_EXAMPLE)
    headers = signed_headers(tenant, "POST", "/v1/send", raw)
    expect(await client.post("/v1/send", content=raw, headers=headers), 200, 0)
    second = await client.post("/v1/send", content=raw, headers=headers)
    expect(second, 401, 100029)
    # Re-signing with the same secret and a case change of the hex is still the same
    # signature, so it is a replay too.
    upper = {**headers, "X-SendKit-Signature": headers["X-SendKit-Signature"].upper()}
    expect(await client.post("/v1/send", content=raw, headers=upper), 401, 100029)


async def test_require_signature_key(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await make_tenant(services, require_signature=True)
    assert tenant.signing_secret is not None
    unsigned = await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth)
    expect(unsigned, 401, 100029)
    listed = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    expect(listed, 401, 100029)
    expect(await signed_send(client, tenant), 200, 0)


async def test_signature_headers_with_a_key_without_secret_is_100029(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert tenant.signing_secret is None
    raw = body_of(SEND_EXAMPLE)
    headers = signed_headers(tenant, "POST", "/v1/send", raw, secret="ss_guessed")
    expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)


async def test_signature_with_another_tenants_secret_is_100029(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    other = await make_tenant(services, name="Other", signing=True)
    assert other.signing_secret is not None
    response = await signed_send(client, tenant, secret=other.signing_secret)
    expect(response, 401, 100029)


async def test_uppercase_hex_signature_is_accepted(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    raw = body_of(SEND_EXAMPLE)
    headers = signed_headers(tenant, "POST", "/v1/send", raw)
    headers["X-SendKit-Signature"] = headers["X-SendKit-Signature"].upper()
    expect(await client.post("/v1/send", content=raw, headers=headers), 200, 0)


async def test_bad_signature_wins_over_inactive_and_expired_account(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, active=False, signing=True)
    await accounts.set_plan(services.db, tenant.account_id, expires="2000-01-01")
    raw = body_of(SEND_EXAMPLE)
    headers = signed_headers(tenant, "POST", "/v1/send", raw)
    headers["X-SendKit-Signature"] = "0" * 64
    expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)
    headers = signed_headers(tenant, "POST", "/v1/send", raw)
    expect(await client.post("/v1/send", content=raw, headers=headers), 403, 100049)


async def test_bad_signatures_do_not_use_the_rate_budget(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services, signing=True)
    await accounts.set_plan(services.db, tenant.account_id, rate=2)
    raw = body_of(SEND_EXAMPLE)
    for _ in range(4):
        headers = signed_headers(tenant, "POST", "/v1/send", raw)
        headers["X-SendKit-Signature"] = "f" * 64
        expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)
    expect(await signed_send(client, tenant), 200, 0)
    # A second signed send in the same second has a new body, so a new signature.
    other = body_of({**SEND_EXAMPLE, "subject": "second"})
    expect(await signed_send(client, tenant, other), 200, 0)
    third = body_of({**SEND_EXAMPLE, "subject": "third"})
    expect(await signed_send(client, tenant, third), 429, 100025)


# --- signature failures that do not need the body come before the body-size check -----


async def oversized_tenant(services: Services, **kwargs: Any) -> tuple[Tenant, bytes]:
    """A tenant whose plan makes a 100 KiB body too large even with the JSON allowance."""
    tenant = await make_tenant(services, **kwargs)
    await accounts.set_plan(services.db, tenant.account_id, max_size=1024)
    limit = 1024 + services.settings.body_overhead
    raw = body_of({**SEND_EXAMPLE, "body": "x" * (limit + 1024)})
    return tenant, raw


async def test_oversized_signed_request_is_413_when_signature_is_fine(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant, raw = await oversized_tenant(services, signing=True)
    headers = signed_headers(tenant, "POST", "/v1/send", raw)
    expect(await client.post("/v1/send", content=raw, headers=headers), 413, 100023)


async def test_missing_required_signature_wins_over_oversized_body(
    client: httpx.AsyncClient, services: Services
) -> None:
    # Check 1 (the key demands a signature and none was sent) needs no body at all, so it
    # must answer 100029 before the body is read and found too large (check 6).
    tenant, raw = await oversized_tenant(services, require_signature=True)
    headers = {**tenant.auth, "Content-Type": "application/json"}
    expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)


async def test_stale_timestamp_wins_over_oversized_body(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant, raw = await oversized_tenant(services, signing=True)
    stale = str(int(time.time()) - 3600)
    headers = signed_headers(tenant, "POST", "/v1/send", raw, timestamp=stale)
    expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)


async def test_signature_headers_without_secret_win_over_oversized_body(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant, raw = await oversized_tenant(services)
    headers = signed_headers(tenant, "POST", "/v1/send", raw, secret="ss_guessed")
    expect(await client.post("/v1/send", content=raw, headers=headers), 401, 100029)
