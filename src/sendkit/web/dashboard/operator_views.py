"""Instance operators: every account, activation, plans, and domains verified by hand."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from sendkit import accounts, domains, messages
from sendkit.errors import SendKitError
from sendkit.web.dashboard.core import (
    Page,
    PageRoute,
    error_message,
    form_of,
    operator,
    redirect,
    render,
    text,
)

router = APIRouter(prefix="/operator", route_class=PageRoute, include_in_schema=False)


@router.get("/accounts")
async def account_list(page: Page = Depends(operator)) -> Response:
    return render(
        page, "operator_accounts.html", summaries=await accounts.list_all(page.services.db)
    )


async def _account_page(page: Page, account_id: str, error: str | None = None) -> Response:
    db = page.services.db
    summary = next((s for s in await accounts.list_all(db) if s.account.id == account_id), None)
    if summary is None:
        await accounts.load(db, account_id)  # raises NotFound
    return render(
        page,
        "operator_account.html",
        status=400 if error else 200,
        s=summary,
        a=summary.account if summary else None,
        domain_list=await domains.list_for_account(db, account_id),
        sent_today=await messages.sent_today(db, account_id),
        error=error,
    )


@router.get("/accounts/{account_id}")
async def account_detail(account_id: str, page: Page = Depends(operator)) -> Response:
    return await _account_page(page, account_id)


@router.post("/accounts/{account_id}/active")
async def account_active(
    account_id: str, request: Request, page: Page = Depends(operator)
) -> Response:
    active = text(await form_of(request), "active") == "true"
    await accounts.set_active(page.services.db, account_id, active)
    word = "activated" if active else "deactivated: its API keys answer 100049"
    return redirect(page, f"/operator/accounts/{account_id}", f"Account {word}.")


def _int_or_none(value: str) -> int | None:
    value = value.strip().replace(",", "").replace("_", "")
    return int(value) if value else None


@router.post("/accounts/{account_id}/plan")
async def account_plan(
    account_id: str, request: Request, page: Page = Depends(operator)
) -> Response:
    form = await form_of(request)
    try:
        await accounts.set_plan(
            page.services.db,
            account_id,
            rate=_int_or_none(text(form, "rate", 20)),
            daily=_int_or_none(text(form, "daily", 20)),
            max_size=_int_or_none(text(form, "max_size", 20)),
            expires=text(form, "expires", 20).strip() or "never",
        )
    except ValueError:
        return await _account_page(
            page, account_id, "Rate, daily limit and size are whole numbers."
        )
    except SendKitError as exc:
        return await _account_page(page, account_id, error_message(exc))
    return redirect(page, f"/operator/accounts/{account_id}", "Plan saved.")


@router.post("/accounts/{account_id}/domains/{name}/verified")
async def domain_verified(
    account_id: str, name: str, request: Request, page: Page = Depends(operator)
) -> Response:
    verified = text(await form_of(request), "verified") == "true"
    await domains.set_verified(page.services.db, account_id, name, verified)
    word = "marked verified" if verified else "marked not verified"
    return redirect(page, f"/operator/accounts/{account_id}", f"{name} {word}.")
