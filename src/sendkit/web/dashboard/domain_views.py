"""Sending domains: add, the DNS records to publish, verification, and senders."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from sendkit import dns_check, domains
from sendkit.errors import SendKitError
from sendkit.web.dashboard.core import (
    Page,
    PageRoute,
    error_message,
    form_of,
    redirect,
    render,
    signed_in,
    text,
)

router = APIRouter(route_class=PageRoute, include_in_schema=False)


async def _domains_page(page: Page, error: str | None = None, name: str = "") -> Response:
    return render(
        page,
        "domains.html",
        status=400 if error else 200,
        domain_list=await domains.list_for_account(page.services.db, page.account_id),
        error=error,
        name=name,
    )


@router.get("/domains")
async def domain_list(page: Page = Depends(signed_in)) -> Response:
    return await _domains_page(page)


@router.post("/domains")
async def domain_add(request: Request, page: Page = Depends(signed_in)) -> Response:
    name = text(await form_of(request), "name", 253).strip()
    services = page.services
    try:
        domain = await domains.add(
            services.db,
            services.box,
            page.account_id,
            name,
            selector=services.settings.dkim_selector,
        )
    except SendKitError as exc:
        return await _domains_page(page, error_message(exc), name)
    return redirect(
        page, f"/domains/{domain.name}", f"Domain {domain.name} added: publish its records."
    )


async def _records(page: Page, name: str) -> list[dict[str, Any]]:
    settings = page.services.settings
    return await domains.dns_records(
        page.services.db,
        page.services.box,
        page.account_id,
        name,
        mail_host=settings.mail_host or settings.ehlo_name,
        return_path_subdomain=settings.return_path_subdomain,
    )


async def _domain_page(
    page: Page,
    name: str,
    *,
    verification: dns_check.Verification | None = None,
    error: str | None = None,
    sender: str = "",
) -> Response:
    info = await domains.get(page.services.db, page.account_id, name)
    return render(
        page,
        "domain.html",
        status=400 if error else 200,
        domain=info,
        records=await _records(page, info.name),
        verification=verification,
        checks={c.record["purpose"]: c for c in verification.checks} if verification else {},
        required=dns_check.REQUIRED,
        error=error,
        sender=sender,
    )


@router.get("/domains/{name}")
async def domain_detail(name: str, page: Page = Depends(signed_in)) -> Response:
    return await _domain_page(page, name)


@router.post("/domains/{name}/verify")
async def domain_verify(name: str, page: Page = Depends(signed_in)) -> Response:
    services = page.services
    settings = services.settings
    info = await domains.get(services.db, page.account_id, name)
    result = await dns_check.verify(
        services.db,
        services.box,
        page.account_id,
        info.name,
        mail_host=settings.mail_host or settings.ehlo_name,
        return_path_subdomain=settings.return_path_subdomain,
        resolver=dns_check.DnsResolver(settings.dns_nameserver),
    )
    if result.verified:
        page.flash(f"{info.name} is verified: you can send from its senders.")
    else:
        page.flash("Not verified yet: the required records were not found (see below).", "error")
    return await _domain_page(page, info.name, verification=result)


@router.post("/domains/{name}/senders")
async def sender_add(name: str, request: Request, page: Page = Depends(signed_in)) -> Response:
    info = await domains.get(page.services.db, page.account_id, name)
    local = text(await form_of(request), "sender", 320).strip()
    address = local if "@" in local else f"{local}@{info.name}"
    if address.rpartition("@")[2].lower() != info.name:
        return await _domain_page(
            page, info.name, error=f"The sender must be an address of {info.name}.", sender=local
        )
    try:
        stored = await domains.add_sender(page.services.db, page.account_id, address)
    except SendKitError as exc:
        return await _domain_page(page, info.name, error=error_message(exc), sender=local)
    shown = f"any address of {info.name}" if stored == domains.ANY_SENDER else stored
    return redirect(page, f"/domains/{info.name}", f"Sender added: {shown}.")


@router.post("/domains/{name}/senders/remove")
async def sender_remove(name: str, request: Request, page: Page = Depends(signed_in)) -> Response:
    address = text(await form_of(request), "sender", 320)
    await domains.remove_sender(page.services.db, page.account_id, name, address)
    return redirect(page, f"/domains/{name}", "Sender removed.")
