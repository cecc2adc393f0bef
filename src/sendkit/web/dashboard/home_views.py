"""Overview, API keys, apps and usage."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from sendkit import apps, domains, keys, message_log, messages
from sendkit.accounts import utc_today
from sendkit.errors import SendKitError
from sendkit.web.dashboard import chart
from sendkit.web.dashboard.core import (
    Page,
    PageRoute,
    checked,
    error_message,
    form_of,
    redirect,
    render,
    signed_in,
    text,
)

router = APIRouter(route_class=PageRoute, include_in_schema=False)


def _example_from(domain_list: list[domains.DomainInfo]) -> str | None:
    """A From address the account may use right now, for the curl example."""
    for info in domain_list:
        if info.verified and info.senders:
            sender = info.senders[0]
            return f"hello@{info.name}" if sender == domains.ANY_SENDER else sender
    return None


async def _key_rows(page: Page) -> list[Any]:
    async with page.services.db.read() as conn:
        return await keys.list_for_account(conn, page.account_id)


@router.get("/")
async def overview(page: Page = Depends(signed_in)) -> Response:
    db, account = page.services.db, page.account
    domain_list = await domains.list_for_account(db, account.id)
    key_rows = await _key_rows(page)
    return render(
        page,
        "overview.html",
        sent_today=await messages.sent_today(db, account.id),
        active_keys=sum(1 for k in key_rows if k.revoked_at is None),
        domains=domain_list,
        verified_domains=[d for d in domain_list if d.verified],
        example_from=_example_from(domain_list),
        app_list=await apps.list_for_account(db, account.id),
        base_url=page.services.settings.public_url(),
    )


# --- API keys ---------------------------------------------------------------------------


async def _keys_page(
    page: Page, *, created: keys.CreatedKey | None = None, error: str | None = None, **form: Any
) -> Response:
    return render(
        page,
        "keys.html",
        status=400 if error else 200,
        key_rows=await _key_rows(page),
        created=created,
        error=error,
        form={"name": "", "signing": False, "require_signature": False} | form,
    )


@router.get("/keys")
async def keys_list(page: Page = Depends(signed_in)) -> Response:
    return await _keys_page(page)


@router.post("/keys")
async def keys_create(request: Request, page: Page = Depends(signed_in)) -> Response:
    form = await form_of(request)
    name = text(form, "name", 200).strip()
    signing, required = checked(form, "signing"), checked(form, "require_signature")
    if not name:
        return await _keys_page(page, error="Give the key a name, such as 'production'.")
    created = await keys.create(
        page.services.db,
        page.services.box,
        page.account_id,
        name=name,
        signing=signing,
        require_signature=required,
    )
    page.flash(f"API key “{name}” created.")
    return await _keys_page(page, created=created)


@router.post("/keys/{prefix}/revoke")
async def keys_revoke(prefix: str, page: Page = Depends(signed_in)) -> Response:
    await keys.revoke(page.services.db, prefix, account_id=page.account_id)
    return redirect(page, "/keys", f"API key {prefix}… revoked: it no longer works.")


# --- apps -------------------------------------------------------------------------------


async def _apps_page(page: Page, error: str | None = None, name: str = "") -> Response:
    return render(
        page,
        "apps.html",
        status=400 if error else 200,
        app_list=await apps.list_for_account(page.services.db, page.account_id),
        error=error,
        name=name,
    )


@router.get("/apps")
async def apps_list(page: Page = Depends(signed_in)) -> Response:
    return await _apps_page(page)


@router.post("/apps")
async def apps_create(request: Request, page: Page = Depends(signed_in)) -> Response:
    name = text(await form_of(request), "name", 200)
    try:
        app = await apps.create(page.services.db, page.account_id, name)
    except SendKitError as exc:
        return await _apps_page(page, error_message(exc), name)
    return redirect(page, "/apps", f"App “{app.name}” created. Its appId is {app.app_id}.")


# --- usage ------------------------------------------------------------------------------


@router.get("/usage")
async def usage(page: Page = Depends(signed_in)) -> Response:
    db, account = page.services.db, page.account
    today = utc_today()
    days = await message_log.daily(db, account.id, today)
    sent_today = await messages.sent_today(db, account.id)
    totals = {s: sum(getattr(d, s) for d in days) for s in chart.SERIES}
    return render(
        page,
        "usage.html",
        sent_today=sent_today,
        percent=min(100, sent_today * 100 // max(1, account.daily_limit)),
        days=days,
        totals=totals,
        chart=chart.build(days),
    )
