"""The dashboard over HTTP, on both databases: sign-up and activation, sessions, CSRF,
login rate limits, isolation between accounts, and the pages' use of the domain rules."""

from __future__ import annotations

import csv
import io
import re

import httpx
import pytest

from sendkit import accounts, apps, contacts, domains, keys, messages, users
from sendkit.db import sessions
from sendkit.services import Services
from tests.conftest import SEND_EXAMPLE, Tenant, make_tenant
from tests.dnsserver import dns_server
from tests.integration.dashboard_helpers import (
    PASSWORD,
    add_user,
    csrf_in,
    form_token,
    link_in,
    log_in,
    running_worker,
    sign_up,
    submit,
    system_mail_to,
    wait_until_delivered,
)

ACTIVATION_SUBJECT = "Activate your SendKit account"


async def signed_in_tenant(
    client: httpx.AsyncClient, services: Services, email: str = "owner@acme.example"
) -> Tenant:
    tenant = await make_tenant(services)
    await add_user(services, tenant.account_id, email)
    await log_in(client, email)
    return tenant


def title_of(response: httpx.Response) -> str:
    match = re.search(r"<title>(.*?)</title>", response.text, re.S)
    return match.group(1).strip() if match else ""


# --- sign-up and activation -------------------------------------------------------------


async def test_signup_activation_through_the_sandbox_inbox(
    client: httpx.AsyncClient, services: Services
) -> None:
    async with running_worker(services):
        response = await sign_up(client, "New.Person@Example.org", "Newco")
        assert response.status_code == 303 and response.headers["location"] == "/"
        home = await client.get("/")
        assert "Your account is not activated yet" in home.text
        assert "100049" in home.text

        # A key works only once the account is active: 100049 until then.
        created = await submit(client, "/keys", {"name": "first"})
        token = re.search(r'id="new-api-key" type="text" value="([^"]+)"', created.text)
        assert token is not None
        auth = {"Authorization": f"Bearer {token.group(1)}"}
        refused = await client.post("/v1/send", json=SEND_EXAMPLE, headers=auth)
        assert refused.status_code == 403 and refused.json()["code"] == 100049

        view = await system_mail_to(services, "new.person@example.org", ACTIVATION_SUBJECT)
        await wait_until_delivered(services, view.row["id"])
    inbox = await client.get("/inbox")
    assert ACTIVATION_SUBJECT in inbox.text
    detail = await client.get(f"/inbox/{view.row['id']}")
    assert detail.status_code == 200 and "Kept" not in detail.text
    body = await client.get(f"/messages/{view.row['id']}/body")
    assert "default-src 'none'" in body.headers["content-security-policy"]
    activated = await client.get(link_in(view, "/activate"))
    assert activated.status_code == 303
    home = await client.get("/")
    assert "not activated" not in home.text
    # Now the documented example answers 100030 (no verified domain yet), not 100049.
    later = await client.post("/v1/send", json=SEND_EXAMPLE, headers=auth)
    assert later.json()["code"] == 100030


async def test_signup_refuses_a_taken_address_and_bad_input(
    client: httpx.AsyncClient, services: Services
) -> None:
    await sign_up(client, "taken@example.org")
    await client.post("/logout", data={"csrf_token": await form_token(client, "/")})
    again = await sign_up(client, "TAKEN@example.org")
    assert again.status_code == 400 and "already exists" in again.text
    short = await sign_up(client, "short@example.org", password="1234")
    assert short.status_code == 400 and "at least 8 characters" in short.text
    bad = await sign_up(client, "not-an-address")
    assert bad.status_code == 400


async def test_bad_or_expired_activation_link(
    client: httpx.AsyncClient, services: Services
) -> None:
    await sign_up(client, "someone@example.org")
    user = await users.find_by_email(services.db, "someone@example.org")
    assert user is not None
    expired = users.activation_token(services.box, user, 1)
    for token in (expired, expired[:-3] + "xyz", "garbage", ""):
        response = await client.get("/activate", params={"token": token})
        assert response.status_code == 400
        assert "does not work" in response.text
    assert not (await accounts.load(services.db, user.account_id)).active


# --- sessions, cookies, CSRF ------------------------------------------------------------


def _cookie_header(response: httpx.Response, name: str) -> str:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith(name + "="):
            return value
    raise AssertionError(f"no {name} cookie set")


async def test_login_issues_a_new_session_id_with_safe_cookie_flags(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services)
    await add_user(services, tenant.account_id, "a@acme.example")
    first = await log_in(client, "a@acme.example")
    cookie = _cookie_header(first, "sendkit_session")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    old = client.cookies["sendkit_session"]
    # Logging in again (another tab), with the old cookie: a new id, the old one ends.
    again = await submit(
        client, "/login", {"email": "a@acme.example", "password": PASSWORD}, page="/"
    )
    assert again.status_code == 303
    new = client.cookies["sendkit_session"]
    assert new != old
    assert await users.load_session(services.db, old) is None  # replaced, not kept
    async with services.db.read() as conn:
        stored = {row.id for row in await conn.execute(sessions.select())}
    assert new not in stored  # only its hash is kept
    logout = await submit(client, "/logout", page="/")
    assert logout.status_code == 303
    assert await users.load_session(services.db, new) is None
    assert (await client.get("/keys")).status_code == 303


async def test_session_cookie_is_secure_under_https(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services)
    await add_user(services, tenant.account_id, "s@acme.example")
    secure_client = httpx.AsyncClient(transport=client._transport, base_url="https://sendkit.test")
    async with secure_client:
        response = await log_in(secure_client, "s@acme.example")
    assert "Secure" in _cookie_header(response, "sendkit_session")


async def test_state_changing_forms_refuse_a_missing_or_wrong_csrf_token(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await signed_in_tenant(client, services)

    async def key_count() -> int:
        async with services.db.read() as conn:
            return len(await keys.list_for_account(conn, tenant.account_id))

    before = await key_count()
    for data in ({"name": "x"}, {"name": "x", "csrf_token": "forged"}):
        refused = await client.post("/keys", data=data)
        assert refused.status_code == 403
        assert "This form has expired" in refused.text
    token = await form_token(client, "/keys")
    for action in ("/apps", "/domains", f"/keys/{tenant.key_prefix}/revoke", "/logout"):
        assert (await client.post(action, data={"name": "x"})).status_code == 403, action
    assert await key_count() == before
    # The token of the page, as a form field or as htmx's header, is accepted.
    assert (await client.post("/keys", data={"name": "y", "csrf_token": token})).status_code == 200
    header = await client.post("/keys", data={"name": "z"}, headers={"X-CSRF-Token": token})
    assert header.status_code == 200
    assert await key_count() == before + 2


async def test_anonymous_forms_need_their_cookie_and_token(client: httpx.AsyncClient) -> None:
    # No cookie yet: a forged cross-site login is refused.
    refused = await client.post("/login", data={"email": "a@b.example", "password": "x"})
    assert refused.status_code == 403
    token = await form_token(client, "/login")  # sets the anonymous cookie
    client.cookies.set("sendkit_csrf", "another-browser-cookie-value-0123456789")
    again = await client.post(
        "/login", data={"email": "a@b.example", "password": "x", "csrf_token": token}
    )
    assert again.status_code == 403


async def test_login_attempts_are_rate_limited(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services)
    await add_user(services, tenant.account_id, "slow@acme.example")
    for _ in range(5):
        wrong = await submit(
            client, "/login", {"email": "slow@acme.example", "password": "nope-nope"}
        )
        assert wrong.status_code == 401
        assert "Wrong email or password" in wrong.text
    blocked = await submit(client, "/login", {"email": "slow@acme.example", "password": PASSWORD})
    assert blocked.status_code == 429
    assert "Too many attempts" in blocked.text and int(blocked.headers["retry-after"]) >= 1
    assert "sendkit_session" not in client.cookies


async def test_password_reset_link_works_once(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await make_tenant(services)
    await add_user(services, tenant.account_id, "forgetful@acme.example")
    unknown = await submit(client, "/forgot", {"email": "nobody@acme.example"})
    sent = await submit(client, "/forgot", {"email": "Forgetful@acme.example"})
    assert unknown.status_code == sent.status_code == 200
    assert "If an account exists" in unknown.text and "If an account exists" in sent.text
    view = await system_mail_to(services, "forgetful@acme.example", "Reset your SendKit password")
    link = link_in(view, "/reset")
    form = await client.get(link)
    assert form.status_code == 200 and "forgetful@acme.example" in form.text
    token = link.split("token=", 1)[1]
    data = {"token": token, "password": "a whole new secret", "confirm": "a whole new secret"}
    done = await client.post("/reset", data=data | {"csrf_token": csrf_in(form.text)})
    assert done.status_code == 303 and done.headers["location"] == "/login"
    reused = await client.get(link)
    assert reused.status_code == 400  # the password changed: the link is dead
    failed = await submit(
        client, "/login", {"email": "forgetful@acme.example", "password": PASSWORD}
    )
    assert failed.status_code == 401
    await log_in(client, "forgetful@acme.example", "a whole new secret")


# --- isolation between accounts ---------------------------------------------------------


async def test_another_accounts_objects_answer_404(
    client: httpx.AsyncClient, services: Services
) -> None:
    await signed_in_tenant(client, services, "mine@acme.example")
    other = await make_tenant(services, name="Other", domain="other.example")
    other_app = (await apps.list_for_account(services.db, other.account_id))[0]
    await contacts.save(
        services.db,
        other.account_id,
        contacts.SaveContact(
            appId=other_app.app_id, emailAddress="x@other.example", status="Confirmed"
        ),
    )
    found = await contacts.search(
        services.db, other.account_id, other_app.app_id, contacts.ContactSearch()
    )
    contact_id = found["list"][0]["id"]
    account = await accounts.load(services.db, other.account_id)
    request = messages.SendRequest.model_validate(SEND_EXAMPLE | {"from": "a@other.example"})
    accepted = await messages.submit(services.db, account, request, "req-1")

    missing = await client.get("/messages/" + "0" * 32)
    assert missing.status_code == 404
    gets = [
        f"/apps/{other_app.app_id}/contacts",
        f"/apps/{other_app.app_id}/contacts/{contact_id}",
        f"/apps/{other_app.app_id}/contacts.csv",
        f"/apps/{other_app.app_id}/import",
        f"/messages/{accepted.message_id}",
        f"/messages/{accepted.message_id}/body",
        f"/messages/{accepted.message_id}/raw",
        f"/inbox/{accepted.message_id}",
        "/messages/req-1",
        "/domains/other.example",
        "/operator/accounts",
        f"/operator/accounts/{other.account_id}",
    ]
    for path in gets:
        response = await client.get(path)
        assert response.status_code == 404, path
        assert title_of(response) == title_of(missing), path
    token = await form_token(client, "/")
    posts = [
        f"/keys/{other.key_prefix}/revoke",
        f"/apps/{other_app.app_id}/contacts/{contact_id}/delete",
        f"/apps/{other_app.app_id}/contacts/{contact_id}/status",
        "/domains/other.example/verify",
        "/domains/other.example/senders",
        f"/operator/accounts/{other.account_id}/active",
    ]
    for path in posts:
        response = await client.post(path, data={"csrf_token": token, "status": "Unsubscribed"})
        assert response.status_code == 404, path
    # Nothing of theirs changed.
    async with services.db.read() as conn:
        other_keys = await keys.list_for_account(conn, other.account_id)
    assert all(k.revoked_at is None for k in other_keys)
    again = await contacts.search(
        services.db, other.account_id, other_app.app_id, contacts.ContactSearch()
    )
    assert again["list"][0]["status"] == "Confirmed"
    # My own app with their contact's id: still not found.
    mine = await apps.create(
        services.db,
        (await users.find_by_email(services.db, "mine@acme.example")).account_id,
        "Mine",
    )  # type: ignore[union-attr]
    assert (await client.get(f"/apps/{mine.app_id}/contacts/{contact_id}")).status_code == 404


async def test_unknown_pages_are_html_for_browsers_and_envelopes_for_api_clients(
    client: httpx.AsyncClient,
) -> None:
    browser = await client.get("/no-such-page", headers={"Accept": "text/html"})
    assert browser.status_code == 404 and "Page not found" in browser.text
    api = await client.get("/no-such-page")
    assert api.status_code == 404 and api.json()["code"] == 100404
    v1 = await client.get("/v1/nope", headers={"Accept": "text/html"})
    assert v1.json()["code"] == 100404


# --- the pages call the domain functions ------------------------------------------------


async def test_keys_page_shows_a_key_once_and_revokes_it(
    client: httpx.AsyncClient, services: Services
) -> None:
    await signed_in_tenant(client, services)
    created = await submit(
        client, "/keys", {"name": "ci", "signing": "on", "require_signature": "on"}
    )
    assert created.status_code == 200
    key = re.search(r'id="new-api-key" type="text" value="(sk_[^"]+)"', created.text)
    secret = re.search(r'id="new-signing-secret" type="text" value="(ss_[^"]+)"', created.text)
    assert key and secret
    assert created.headers["cache-control"] == "no-store"
    listing = await client.get("/keys")
    assert key.group(1) not in listing.text and key.group(1)[:11] in listing.text
    unsigned = await client.post(
        "/v1/send", json=SEND_EXAMPLE, headers={"Authorization": f"Bearer {key.group(1)}"}
    )
    assert unsigned.json()["code"] == 100029  # signature required
    revoked = await submit(client, f"/keys/{key.group(1)[:11]}/revoke", page="/keys")
    assert revoked.status_code == 303
    assert "revoked" in (await client.get("/keys")).text


async def test_contacts_pages_follow_the_api_rules(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await signed_in_tenant(client, services)
    base = f"/apps/{tenant.app_id}/contacts"
    fields = {
        "emailAddress": "Jane@Example.com",
        "status": "Confirmed",
        "firstName": "Jane",
        "lastName": "Doe",
        "birthday": "01/12",
        "vipLevel": "2",
        "amount": "10.50",
    }
    added = await submit(client, base + "/new", fields)
    assert added.status_code == 303
    bad = await submit(
        client, base + "/new", fields | {"emailAddress": "x@example.com", "birthday": "31/02"}
    )
    assert bad.status_code == 400 and "Birthday is not a real date" in bad.text
    listed = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    [item] = listed.json()["data"]["list"]
    assert item["firstName"] == "Jane" and item["vipLevel"] == 2 and item["amount"] == "10.50"
    found = await contacts.search(
        services.db, tenant.account_id, tenant.app_id, contacts.ContactSearch()
    )
    cid = found["list"][0]["id"]
    edited = await submit(client, f"{base}/{cid}", {"firstName": "Janet", "company": "Acme"})
    assert edited.status_code == 303
    item = (
        await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    ).json()["data"]["list"][0]
    assert item["firstName"] == "Janet" and item["company"] == "Acme" and item["lastName"] == ""
    token = await form_token(client, base)
    unsub = await client.post(
        f"{base}/{cid}/status", data={"csrf_token": token, "status": "Unsubscribed"}
    )
    assert unsub.status_code == 303
    assert "Unsubscribed" in (await client.get(base, params={"status": "Unsubscribed"})).text
    assert "No contact matches" in (await client.get(base, params={"status": "Confirmed"})).text
    assert "Jane@example.com" in (await client.get(base, params={"q": "janet"})).text
    partial = await client.get(
        base, params={"q": "jane@"}, headers={"HX-Request": "true", "HX-Target": "contact-table"}
    )
    assert partial.text.lstrip().startswith('<div id="contact-table">')
    exported = await client.get(f"/apps/{tenant.app_id}/contacts.csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert rows[0]["emailAddress"] == "Jane@example.com" and rows[0]["status"] == "Unsubscribed"
    assert exported.headers["content-disposition"].startswith("attachment")
    deleted = await client.post(f"{base}/{cid}/delete", data={"csrf_token": token})
    assert deleted.status_code == 303
    gone = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    assert gone.json()["data"]["total"] == 0


async def test_message_log_filters_and_detail(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await signed_in_tenant(client, services)
    ids = []
    for to in ("alice@example.net", "bob@example.net"):
        sent = await client.post(
            "/v1/send",
            json=SEND_EXAMPLE
            | {"to": to, "body": "<p>Hi <b>there</b></p><img src='https://x.example/p.gif'>"},
            headers=tenant.auth,
        )
        ids.append(sent.headers["x-message-id"])
    request_id = sent.json()["requestId"]
    assert "alice@example.net" in (await client.get("/messages", params={"q": "alice"})).text
    only_bob = await client.get("/messages", params={"q": request_id})
    assert "bob@example.net" in only_bob.text and "alice@example.net" not in only_bob.text
    assert (
        "No message matches" in (await client.get("/messages", params={"status": "bounced"})).text
    )
    assert "alice@example.net" in (await client.get("/messages", params={"status": "queued"})).text
    assert (
        "No message matches" in (await client.get("/messages", params={"since": "2999-01-01"})).text
    )
    detail = await client.get(f"/messages/{ids[0]}")
    assert detail.status_code == 200
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in detail.text
    assert "allow-scripts" not in detail.text and "allow-same-origin" not in detail.text
    assert "Subject" in detail.text and "Content-Type" in detail.text
    body = await client.get(f"/messages/{ids[0]}/body")
    csp = body.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "img-src data:" in csp and "sandbox" in csp
    assert "<b>there</b>" in body.text
    raw = await client.get(f"/messages/{ids[0]}/raw")
    assert raw.headers["content-type"].startswith("message/rfc822")
    assert b"Subject: test send" in raw.content


async def test_domain_verification_with_published_records(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await signed_in_tenant(client, services)
    added = await submit(client, "/domains", {"name": "Mail.Acme.Example"})
    assert added.status_code == 303 and added.headers["location"] == "/domains/mail.acme.example"
    page = await client.get("/domains/mail.acme.example")
    assert "sendkit._domainkey.mail.acme.example" in page.text and "v=DKIM1" in page.text
    records = await domains.dns_records(
        services.db,
        services.box,
        tenant.account_id,
        "mail.acme.example",
        mail_host=services.settings.mail_host or services.settings.ehlo_name,
        return_path_subdomain=services.settings.return_path_subdomain,
    )
    with dns_server() as dns:
        services.settings.dns_nameserver = dns.nameserver
        first = await submit(
            client, "/domains/mail.acme.example/verify", page="/domains/mail.acme.example"
        )
        assert first.status_code == 200 and "Not verified yet" in first.text
        dns.zone.publish_all([r for r in records if r["purpose"] in ("SPF", "DKIM")])
        second = await submit(
            client, "/domains/mail.acme.example/verify", page="/domains/mail.acme.example"
        )
    assert "is verified" in second.text
    assert (await domains.get(services.db, tenant.account_id, "mail.acme.example")).verified
    sender = await submit(
        client,
        "/domains/mail.acme.example/senders",
        {"sender": "hello"},
        page="/domains/mail.acme.example",
    )
    assert sender.status_code == 303
    sent = await client.post(
        "/v1/send", json=SEND_EXAMPLE | {"from": "hello@mail.acme.example"}, headers=tenant.auth
    )
    assert sent.json()["code"] == 0
    wrong = await submit(
        client,
        "/domains/mail.acme.example/senders",
        {"sender": "x@elsewhere.example"},
        page="/domains/mail.acme.example",
    )
    assert wrong.status_code == 400


async def test_operator_pages(client: httpx.AsyncClient, services: Services) -> None:
    admin_account = await accounts.create(services.db, "Ops", active=True)
    await add_user(services, admin_account, "ops@instance.example", is_operator=True)
    customer = await make_tenant(services, name="Customer", active=False)
    await log_in(client, "ops@instance.example")
    listing = await client.get("/operator/accounts")
    assert listing.status_code == 200 and "Customer" in listing.text
    page = f"/operator/accounts/{customer.account_id}"
    assert (
        await submit(client, page + "/active", {"active": "true"}, page=page)
    ).status_code == 303
    plan = {"rate": "7", "daily": "123", "max_size": "2048", "expires": "2099-12-31"}
    assert (await submit(client, page + "/plan", plan, page=page)).status_code == 303
    account = await accounts.load(services.db, customer.account_id)
    assert account.active and account.rate_per_second == 7 and account.daily_limit == 123
    assert account.max_message_size == 2048 and account.expires_on == "2099-12-31"
    bad = await submit(client, page + "/plan", plan | {"rate": "0"}, page=page)
    assert bad.status_code == 400


async def test_usage_page_counts_todays_sends(
    client: httpx.AsyncClient, services: Services
) -> None:
    tenant = await signed_in_tenant(client, services)
    await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth)
    page = await client.get("/usage")
    assert page.status_code == 200
    assert re.search(r'<progress value="1" max="10000"', page.text)
    assert "<svg" in page.text and "polyline" in page.text


@pytest.mark.parametrize(
    "path", ["/", "/keys", "/apps", "/messages", "/domains", "/inbox", "/usage"]
)
async def test_pages_need_a_login(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


async def test_system_mail_is_readable_by_its_recipient_and_operators_only(
    client: httpx.AsyncClient, services: Services
) -> None:
    ops_account = await accounts.create(services.db, "Ops", active=True)
    await add_user(services, ops_account, "ops@instance.example", is_operator=True)
    async with running_worker(services):
        await sign_up(client, "first@example.org", "First")
        view = await system_mail_to(services, "first@example.org", ACTIVATION_SUBJECT)
        await wait_until_delivered(services, view.row["id"])
    await submit(client, "/logout", page="/")
    await sign_up(client, "second@example.org", "Second")
    assert ACTIVATION_SUBJECT not in (await client.get("/inbox")).text  # not delivered yet
    assert (await client.get(f"/inbox/{view.row['id']}")).status_code == 404  # not theirs
    await submit(client, "/logout", page="/")
    await log_in(client, "ops@instance.example")
    inbox = await client.get("/inbox")
    assert ACTIVATION_SUBJECT in inbox.text and "first@example.org" in inbox.text
    assert (await client.get(f"/inbox/{view.row['id']}")).status_code == 200


async def test_an_operator_deactivation_is_not_undone_by_activation_links(
    client: httpx.AsyncClient, services: Services
) -> None:
    await sign_up(client, "owner@example.org", "Owner")
    view = await system_mail_to(services, "owner@example.org", ACTIVATION_SUBJECT)
    link = link_in(view, "/activate")
    assert (await client.get(link)).status_code == 303
    user = await users.find_by_email(services.db, "owner@example.org")
    assert user is not None
    await accounts.set_active(services.db, user.account_id, False)  # the operator's button
    home = await client.get("/")
    assert "This account is deactivated" in home.text and "Send the activation" not in home.text
    again = await client.get(link)
    assert again.status_code == 400 and "deactivated by an instance operator" in again.text
    resend = await submit(client, "/activate/resend", page="/")
    assert resend.status_code == 303
    assert not (await accounts.load(services.db, user.account_id)).active
    await accounts.set_active(services.db, user.account_id, True)
    assert (await accounts.load(services.db, user.account_id)).active
