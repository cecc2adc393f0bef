"""Webhooks (endpoints, their delivery log, replay) and the suppression list (view, add,
remove, export) in the dashboard. Thin: each view calls the function the API calls."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.responses import Response

from sendkit import suppressions, webhooks
from sendkit.errors import SendKitError
from sendkit.events import ALL_TYPES, ANY
from sendkit.validation import parse
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

_PAGE_SIZE = 50


# --- webhooks -----------------------------------------------------------------------------


async def _webhooks_page(
    page: Page,
    *,
    error: str | None = None,
    url: str = "",
    chosen: tuple[str, ...] = (ANY,),
    created: dict[str, object] | None = None,
) -> Response:
    return render(
        page,
        "webhooks.html",
        status=400 if error else 200,
        endpoints=await webhooks.list_endpoints(page.services.db, page.account_id),
        event_types=ALL_TYPES,
        error=error,
        url=url,
        chosen=chosen,
        created=created,
    )


@router.get("/webhooks")
async def webhook_list(page: Page = Depends(signed_in)) -> Response:
    return await _webhooks_page(page)


@router.post("/webhooks")
async def webhook_add(request: Request, page: Page = Depends(signed_in)) -> Response:
    form = await form_of(request)
    url = text(form, "url", 2000).strip()
    picked = tuple(str(v) for v in form.getlist("events") if isinstance(v, str))
    chosen = picked if picked and ANY not in picked else (ANY,)
    services = page.services
    try:
        payload = parse(webhooks.CreateWebhook, {"url": url, "events": list(chosen)})
        created = await webhooks.create_endpoint(
            services.db, services.box, services.settings, page.account_id, payload
        )
    except SendKitError as exc:
        return await _webhooks_page(page, error=error_message(exc), url=url, chosen=chosen)
    # Rendered, not redirected: the secret is shown in this answer only.
    return await _webhooks_page(page, created=created)


async def _webhook_page(
    page: Page, endpoint_id: str, *, secret: str | None = None, status: str = ""
) -> Response:
    db = page.services.db
    endpoint = await webhooks.get_endpoint(db, page.account_id, endpoint_id)
    query = parse(webhooks.DeliveryQuery, {"status": status or None, "limit": _PAGE_SIZE})
    found = await webhooks.list_deliveries(db, page.account_id, endpoint_id, query)
    return render(
        page,
        "webhook.html",
        endpoint=endpoint,
        deliveries=found,
        secret=secret,
        filter_status=status,
        statuses=("pending", "sending", "delivered", "failed"),
    )


@router.get("/webhooks/{endpoint_id}")
async def webhook_detail(
    endpoint_id: str, request: Request, page: Page = Depends(signed_in)
) -> Response:
    status = request.query_params.get("status", "")
    if status not in ("", "pending", "sending", "delivered", "failed"):
        status = ""
    return await _webhook_page(page, endpoint_id, status=status)


@router.post("/webhooks/{endpoint_id}/enabled")
async def webhook_toggle(
    endpoint_id: str, request: Request, page: Page = Depends(signed_in)
) -> Response:
    enable = text(await form_of(request), "enabled") == "1"
    services = page.services
    change = webhooks.UpdateWebhook(enabled=enable)
    await webhooks.update_endpoint(
        services.db, services.settings, page.account_id, endpoint_id, change
    )
    message = "Endpoint enabled." if enable else "Endpoint disabled: no new deliveries."
    return redirect(page, f"/webhooks/{endpoint_id}", message)


@router.post("/webhooks/{endpoint_id}/secret")
async def webhook_rotate(endpoint_id: str, page: Page = Depends(signed_in)) -> Response:
    services = page.services
    secret = await webhooks.rotate_secret(services.db, services.box, page.account_id, endpoint_id)
    return await _webhook_page(page, endpoint_id, secret=secret)


@router.post("/webhooks/{endpoint_id}/delete")
async def webhook_delete(endpoint_id: str, page: Page = Depends(signed_in)) -> Response:
    await webhooks.delete_endpoint(page.services.db, page.account_id, endpoint_id)
    return redirect(page, "/webhooks", "Endpoint deleted, with its delivery log.")


@router.post("/webhooks/{endpoint_id}/replay/{delivery_id}")
async def webhook_replay(
    endpoint_id: str, delivery_id: str, page: Page = Depends(signed_in)
) -> Response:
    services = page.services
    try:
        await webhooks.replay(services.db, page.account_id, endpoint_id, delivery_id)
    except SendKitError as exc:
        if exc.status == 404:
            raise
        return redirect(page, f"/webhooks/{endpoint_id}", error_message(exc), "error")
    worker = services.extras.get("webhook_worker")
    if worker is not None:
        worker.wakeup.set()
    return redirect(page, f"/webhooks/{endpoint_id}", "Replay queued: it goes out in a moment.")


# --- suppressions -------------------------------------------------------------------------


async def _suppressions_page(
    page: Page, request: Request, *, error: str | None = None, email: str = ""
) -> Response:
    params = dict(request.query_params) | {"pageSize": str(_PAGE_SIZE)}
    try:
        query = parse(suppressions.SuppressionQuery, params)
    except SendKitError:
        query = suppressions.SuppressionQuery(pageSize=_PAGE_SIZE)
    found = await suppressions.list_page(page.services.db, page.account_id, query)
    return render(
        page,
        "suppressions.html",
        status=400 if error else 200,
        result=found,
        query=query,
        reasons=[r.value for r in suppressions.Reason],
        has_next=query.page * query.pageSize < found["total"],
        error=error,
        email=email,
    )


@router.get("/suppressions")
async def suppression_list(request: Request, page: Page = Depends(signed_in)) -> Response:
    return await _suppressions_page(page, request)


@router.post("/suppressions")
async def suppression_add(request: Request, page: Page = Depends(signed_in)) -> Response:
    email = text(await form_of(request), "email", 320).strip()
    try:
        payload = parse(suppressions.AddSuppression, {"emailAddress": email})
        added = await suppressions.add_manual(page.services.db, page.account_id, payload)
    except SendKitError as exc:
        return await _suppressions_page(page, request, error=error_message(exc), email=email)
    message = f"{payload.emailAddress} will not get email from this account."
    if not added:
        message = f"{payload.emailAddress} was already on the list."
    return redirect(page, "/suppressions", message)


@router.post("/suppressions/remove")
async def suppression_remove(request: Request, page: Page = Depends(signed_in)) -> Response:
    email = text(await form_of(request), "email", 320).strip()
    try:
        await suppressions.remove(page.services.db, page.account_id, email)
    except SendKitError as exc:
        return redirect(page, "/suppressions", error_message(exc), "error")
    return redirect(page, "/suppressions", f"{email} can get email again.")


@router.get("/suppressions/export")
async def suppression_export(page: Page = Depends(signed_in)) -> Response:
    return StreamingResponse(
        suppressions.export_csv(page.services.db, page.account_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'},
    )
